"""Fine-tuning (FT) and NAD as stages of the shared training loop.

FT is, literally, the NAD stage with every beta set to 0: the same schedule
(`config.nad`), the same clean subset, the same batches and augmentation (it
takes NAD's PRNG stream) and the cross-entropy alone. So FT and NAD differ in
the attention-distillation term only.
"""

from nad_jax import pipeline
from nad_jax import validation


def nad_recipe(config, betas=None):
  layers = validation.distill_layers(config)
  betas = config.nad.betas if betas is None else betas
  return pipeline.recipe_for(config.nad, tuple(betas), layers, config.nad.p)


def finetune(ctx: pipeline.Context, student, clean, name: str = 'ft'):
  """The backdoored `student` fine-tuned on `clean` (images, labels, mask): NAD with betas 0."""
  recipe = nad_recipe(ctx.config, (0.0,) * len(ctx.config.nad.betas))
  return pipeline.train_stage(ctx, name, ctx.config.nad, recipe, student, *clean, None,
                              key_stage='nad')


def nad(ctx: pipeline.Context, student, teacher, clean):
  """NAD: `student` fine-tuned on `clean` with CE + attention distillation from `teacher`."""
  return pipeline.train_stage(ctx, 'nad', ctx.config.nad, nad_recipe(ctx.config), student,
                              *clean, None, teacher=teacher)
