"""Fine-tuning (FT): the NAD stage with every beta 0.

The same schedule (`config.nad`), the same clean subset, the same batches and
augmentation (it takes NAD's random stream) and the cross-entropy alone: FT and
NAD differ in the attention-distillation term only.
"""

from nad_jax import stages
from nad_jax.defenses import nad as nad_lib


def finetune(ctx: stages.Context, student, clean, name: str = 'ft',
             student_metrics: dict | None = None) -> stages.StageResult:
  """The backdoored `student` fine-tuned on `clean` with CE only.

  Args:
    ctx: the stage Context.
    student: the backdoored model's {'params', 'batch_stats'}.
    clean: the clean subset (images, labels, mask), as `stages.clean_data` returns.
    name: the stage's name and folder.
    student_metrics: the backdoored model's METRICS where known (its stage's last
      evaluation), recorded as epoch 0 instead of evaluating `student` again.

  Returns:
    StageResult of the fine-tuned model.
  """
  recipe = nad_lib.nad_recipe(ctx.config, (0.0,) * len(ctx.config.nad.betas))
  return stages.train_stage(ctx, name, ctx.config.nad, recipe, student, *clean, None,
                            stream='nad', start_metrics=student_metrics)
