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
from nad_jax import defaults

DEFAULT_ATTACKS = ('badnets', 'blend')
EVAL_EVERY = 2


def get_config(arg=None):
  tokens = [t for t in (arg or '').split(',') if t]
  cifar = 'cifar' in tokens
  tokens = [t for t in tokens if t != 'cifar']
  if 'all' in tokens:
    if tokens != ['all']:
      raise ValueError(f"configs/table1.py: 'all' stands alone (with 'cifar' at most), got {arg!r}")
    attacks = common.ATTACK_VARIANTS
  else:
    attacks = tuple(tokens) or DEFAULT_ATTACKS
  for attack in attacks:
    if attack not in common.ATTACK_VARIANTS:
      raise ValueError(f'configs/table1.py has no attack {attack!r}; choose from '
                       f"{common.ATTACK_VARIANTS}, 'all' or 'cifar'")
  config = defaults.paper_config() if cifar else quickstart.get_config()
  config.runner = 'table1'
  if not cifar:  # the 15-minute budget on 2 CPU cores: evaluate and checkpoint every 2 epochs
    for stage in ('backdoor_training', 'teacher', 'nad'):
      config[stage].eval_every = EVAL_EVERY
  defaults.defense_stages(config)
  attack_configs = {}
  for variant in common.ATTACK_VARIANTS:
    variant_config = common.set_attack(copy.deepcopy(config), variant, 'configs/table1.py')
    attack_configs[variant] = variant_config.attack
  config.table = ml_collections.ConfigDict(dict(
      attacks=tuple(attacks), defenses=('none', 'ft', 'fp', 'mcr', 'nad'),
      attack_configs=ml_collections.ConfigDict(attack_configs),
      figures=True, attention_images=4))
  # Each attack's settings live in table.attack_configs.<attack>; a top-level attack section
  # would take overrides that no run reads.
  del config['attack']
  return config
