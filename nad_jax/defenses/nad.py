"""NAD (Li et al., "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
Neural Networks", ICLR 2021): the teacher, then the student distilled from it.

The teacher is the backdoored model fine-tuned on the clean subset with CE only
(`config.teacher`; `teacher.source` 'scratch': a fresh model trained on it, an
ablation). The student starts from the backdoored model and trains on the same
subset with CE + sum_i beta_i * AT_i against the frozen teacher's attention maps
(`config.nad`; train.make_loss, attention.distillation_losses).
"""

from nad_jax import stages
from nad_jax import validation


def nad_recipe(config, betas=None):
  """The NAD stage's train.Recipe; `betas` replaces `nad.betas` (FT: zeros)."""
  layers = validation.distill_layers(config)
  betas = config.nad.betas if betas is None else betas
  return stages.recipe_for(config.nad, tuple(betas), layers, config.nad.p)


def teacher(ctx: stages.Context, student,
            student_metrics: dict | None = None) -> stages.StageResult:
  """`teacher.checkpoint`, or the teacher trained on the clean subset (CE only).

  Args:
    ctx: the stage Context.
    student: the backdoored model's {'params', 'batch_stats'}: where a 'finetune'
      teacher starts ('scratch' starts from a fresh initialisation).
    student_metrics: the backdoored model's METRICS where known (its stage's last
      evaluation), recorded as a fine-tuned teacher's epoch 0 instead of evaluating
      `student` again; None: evaluated.

  Returns:
    StageResult of the teacher.
  """
  config = ctx.config
  if 'teacher' in ctx.checkpoints:
    return stages.pretrained(ctx, ctx.checkpoints['teacher'], config.teacher.checkpoint,
                             'teacher')
  if config.teacher.source == 'scratch':
    start, student_metrics = stages.init_variables(ctx, 'scratch_teacher_init'), None
  else:
    start = student
  return stages.train_stage(ctx, 'teacher', config.teacher, stages.recipe_for(config.teacher),
                            start, *stages.clean_data(ctx), None,
                            start_metrics=student_metrics)


def distill(ctx: stages.Context, student, teacher_variables, clean,
            student_metrics: dict | None = None) -> stages.StageResult:
  """The NAD stage: `student` trained on `clean` with CE + attention distillation.

  Args:
    ctx: the stage Context.
    student: the backdoored model's {'params', 'batch_stats'}.
    teacher_variables: the frozen teacher's (not trained, not checkpointed).
    clean: the clean subset (images, labels, mask), as `stages.clean_data` returns.
    student_metrics: the backdoored model's METRICS where known, recorded as epoch 0
      instead of evaluating `student` again; None: evaluated.

  Returns:
    StageResult of the NAD student.
  """
  return stages.train_stage(ctx, 'nad', ctx.config.nad, nad_recipe(ctx.config), student,
                            *clean, None, frozen=teacher_variables, start_metrics=student_metrics)


def erase(ctx: stages.Context, student, clean,
          student_metrics: dict | None = None) -> stages.StageResult:
  """NAD as one defense: the teacher (trained or loaded), then the student.

  Args:
    ctx, student, clean: as for `distill`.
    student_metrics: the backdoored model's METRICS where known (see `teacher`); None:
      `student` is evaluated once here, for both stages.

  Returns:
    StageResult of the NAD student; info['teacher'] is the teacher's StageResult.
  """
  if student_metrics is None:
    student_metrics = stages.evaluate_first(ctx, student, 'backdoored')
  trained_teacher = teacher(ctx, student, student_metrics)
  result = distill(ctx, student, trained_teacher.variables, clean, student_metrics)
  return result._replace(info={'teacher': trained_teacher})
