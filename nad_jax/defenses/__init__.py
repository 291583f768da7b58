"""NAD and the baseline backdoor defenses of the paper's comparison (its Table 1).

Each defense starts from the backdoored model and the defender's clean subset
(`pipeline.clean_data`) and returns what a pipeline stage returns,
(variables, history, timing), plus, for some, a dict of extra results:

  ft   fine-tuning: the NAD stage with every beta 0 (CE only, NAD's schedule
       and batches) -- `finetune.finetune`.
  fp   fine-pruning (Liu et al., 2018): prune the last layer's least active
       channels, then fine-tune -- `fine_pruning.fine_prune`.
  mcr  mode connectivity repair (Zhao et al., 2020): a quadratic Bezier curve
       from the backdoored to the fine-tuned model, read at t -- `mcr.repair`.
  nad  the teacher (fine-tuned backdoored model) and NAD -- `finetune.nad`.

`nad_jax.experiments.table1.run` runs them for several attacks and writes the comparison
table.
"""

DEFENSES = ('none', 'ft', 'fp', 'mcr', 'nad')
NAMES = {'none': 'No defense', 'ft': 'FT', 'fp': 'FP', 'mcr': 'MCR', 'nad': 'NAD'}
