"""NAD and the baseline backdoor defenses of the paper's comparison (its Table 1).

Each defense is a function erase(ctx, student, clean) -> stages.StageResult, from
the backdoored model's variables and the defender's clean subset
(`stages.clean_data`); every one trains through the engine's TrainEpoch:

  ft   fine-tuning: the NAD stage with every beta 0 (CE only, NAD's schedule
       and batches) -- `finetune.finetune`.
  fp   fine-pruning (Liu et al., 2018): prune the last layer's least active
       channels, then fine-tune -- `fine_pruning.fine_prune`.
  mcr  mode connectivity repair (Zhao et al., 2020): a quadratic Bezier curve
       from the backdoored to the fine-tuned model, read at t -- `mcr.erase`.
  nad  the teacher (the fine-tuned backdoored model), then NAD -- `nad.erase`.

`nad_jax.experiments` runs them: the NAD pipeline and the comparison table.
"""

from nad_jax.defenses import fine_pruning
from nad_jax.defenses import finetune
from nad_jax.defenses import mcr
from nad_jax.defenses import nad

DEFENSES = ('none', 'ft', 'fp', 'mcr', 'nad')
NAMES = {'none': 'No defense', 'ft': 'FT', 'fp': 'FP', 'mcr': 'MCR', 'nad': 'NAD'}
ERASE = {'ft': finetune.finetune, 'fp': fine_pruning.fine_prune, 'mcr': mcr.erase,
         'nad': nad.erase}
