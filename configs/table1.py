"""The defense comparison of the paper's Table 1: attacks x {none, FT, FP, MCR, NAD}.

python main.py --config=configs/table1.py --workdir=runs/table1
On the synthetic quickstart data by default, BadNets and Blend. The variant is a
comma-separated list: attack variants (configs/common.py ATTACK_VARIANTS), 'all'
for every one, 'cifar' for the paper's CIFAR-10 setting instead of quickstart's:
  configs/table1.py:all    configs/table1.py:badnets,sig    configs/table1.py:cifar,all
Writes runs/table1/table1.{md,csv,json} and runs/table1/figures/*.png.
Every attack trains on quickstart's 5-epoch backdoor recipe, including the variants that
configs/quickstart.py trains for 15 epochs (LONG_RECIPE_VARIANTS): their rows are weaker backdoors.
"""

import copy

import ml_collections

from configs import common
from configs import quickstart

DEFAULT_ATTACKS = ('badnets', 'blend')
EVAL_EVERY = 2


def defense_stages(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fine-pruning and MCR settings; FT is config.nad with betas 0."""
  # FP: prune (held-out acc may fall by acc_drop points), then fine-tune with NAD's schedule.
  config.fp = common.sgd_stage(config.nad.epochs, config.nad.batch_size, config.nad.learning_rate,
                               lr_boundaries=config.nad.lr_boundaries, cutout=config.nad.cutout,
                               holdout_fraction=0.2, acc_drop=5.0,
                               eval_every=config.nad.eval_every)
  # MCR: the Bezier control point, t ~ U(0, 1) per step; the curve read at t (paper: 0.3)
  # and evaluated at `points` equally spaced t.
  config.mcr = common.sgd_stage(config.nad.epochs, config.nad.batch_size, 0.02,
                                lr_boundaries=(config.nad.epochs // 2,), t=0.3, points=11,
                                eval_every=config.nad.eval_every)
  return config


def get_config(arg=None):
  tokens = [t for t in (arg or '').split(',') if t]
  cifar = 'cifar' in tokens
  tokens = [t for t in tokens if t != 'cifar']
  if tokens == ['all']:
    attacks = common.ATTACK_VARIANTS
  else:
    attacks = tuple(tokens) or DEFAULT_ATTACKS
  for attack in attacks:
    if attack not in common.ATTACK_VARIANTS:
      raise ValueError(f'configs/table1.py has no attack {attack!r}; choose from '
                       f"{common.ATTACK_VARIANTS}, 'all' or 'cifar'")
  config = common.paper_config() if cifar else quickstart.get_config()
  config.runner = 'table1'
  if not cifar:  # the 15-minute budget on 2 CPU cores: evaluate and checkpoint every 2 epochs
    for stage in ('backdoor_training', 'teacher', 'nad'):
      config[stage].eval_every = EVAL_EVERY
  defense_stages(config)
  attack_configs = {}
  for variant in common.ATTACK_VARIANTS:
    variant_config = common.set_attack(copy.deepcopy(config), variant, 'configs/table1.py')
    attack_configs[variant] = variant_config.attack
  config.table = ml_collections.ConfigDict(dict(
      attacks=tuple(attacks), defenses=('none', 'ft', 'fp', 'mcr', 'nad'),
      attack_configs=ml_collections.ConfigDict(attack_configs),
      figures=True, attention_images=4))
  return config
