"""The defense comparison of the paper's Table 1: attacks x {none, FT, FP, MCR, NAD}.

python main.py --config=configs/table1.py --workdir=runs/table1
On the synthetic quickstart data by default, BadNets and Blend. The variant is a
comma-separated list: attack variants (nad_jax/defaults.py ATTACK_VARIANTS), 'all'
for every one, and at most one base instead of quickstart's: 'cifar' for the paper's
CIFAR-10 setting (configs/nad_cifar.py), 'backdoorbench' for BackdoorBench's
PreAct-ResNet-18 setting (configs/backdoorbench.py; its attacks are badnets, blend, sig, wanet):
  configs/table1.py:all    configs/table1.py:badnets,sig    configs/table1.py:cifar,all
  configs/table1.py:backdoorbench,badnets,blend,sig,wanet
Writes runs/table1/table1.{md,csv,json} and runs/table1/figures/*.png. On the quickstart's
data MCR passes once over the clean subset an epoch, at batch 64 (with 'cifar': the
recipe of nad_jax/defenses/mcr.py, 10,000 samples an epoch at batch 128).
--config.seeds=0,1,2 runs the table once per seed and gives each cell's mean ± std.

Each attack runs exactly what its base config runs (configs/quickstart.py:ATTACK, or
configs/nad_cifar.py:ATTACK with 'cifar', configs/backdoorbench.py:ATTACK with
'backdoorbench'). The top-level sections are the base config's
default (BadNets); `table.attack_configs.<attack>` holds the fields where that attack's
config differs from them (always attack.name and attack.mode), laid over them for its
rows. A top-level override reaches every attack (a field of some attacks alone, like
Blend's attack.alpha, reaches those), unless an attack of the table sets that field itself:
then main.py refuses it and names the per-attack field to set instead, e.g.
  --config.table.attack_configs.blend.teacher.batch_size=8
"""

import ml_collections

from configs import backdoorbench
from configs import nad_cifar
from configs import quickstart
from nad_jax import defaults

DEFAULT_ATTACKS = ('badnets', 'blend')
EVAL_EVERY = 2
QUICK_MCR_BATCH = 64
# The sections an attack variant may set: those of the stages an attack shapes.
ATTACK_SECTIONS = ('attack', 'backdoor_training', 'teacher', 'nad')
# The bases a token of the variant picks instead of the quickstart: (config file, its attacks).
BASES = {'cifar': (nad_cifar, defaults.ATTACK_VARIANTS),
         'backdoorbench': (backdoorbench, backdoorbench.VARIANTS)}


def changed_fields(variant: dict, base: dict) -> dict:
  """The nested fields of `variant` whose value differs from `base` (same shape)."""
  out = {}
  for key, value in variant.items():
    if isinstance(value, dict):
      inner = changed_fields(value, base[key])
      if inner:
        out[key] = inner
    elif value != base[key]:
      out[key] = value
  return out


def attack_sections(base_file, variant: str) -> ml_collections.ConfigDict:
  """What `base_file.get_config(variant)` sets differently from `base_file.get_config()`
  in ATTACK_SECTIONS, with attack.name and attack.mode always (they name the attack)."""
  config, base = base_file.get_config(variant).to_dict(), base_file.get_config().to_dict()
  sections = {s: changed_fields(config[s], base[s]) for s in ATTACK_SECTIONS}
  sections['attack'].update(name=config['attack']['name'], mode=config['attack']['mode'])
  return ml_collections.ConfigDict({s: fields for s, fields in sections.items() if fields})


def quickstart_mcr(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """MCR's recipe on the quickstart's data, in place: one pass over the 250 clean images an
  epoch at the quickstart's batch size, 300 steps instead of the recipe's 7,800 (10,000
  samples an epoch at batch 128), so that the table stays in minutes on 2 CPU cores."""
  config.mcr.update(dict(samples_per_epoch=0, batch_size=QUICK_MCR_BATCH))
  return config


def get_config(arg=None):
  tokens = [t for t in (arg or '').split(',') if t]
  bases = [t for t in tokens if t in BASES]
  if len(bases) > 1:
    raise ValueError(f'configs/table1.py takes one base of {tuple(BASES)} at most, got {arg!r}')
  tokens = [t for t in tokens if t not in BASES]
  base_file, variants = BASES[bases[0]] if bases else (quickstart, defaults.ATTACK_VARIANTS)
  if 'all' in tokens:
    if tokens != ['all']:
      raise ValueError(f"configs/table1.py: 'all' stands alone (with a base at most), got {arg!r}")
    attacks = variants
  else:
    attacks = tuple(tokens) or DEFAULT_ATTACKS
  repeated = sorted({attack for attack in attacks if attacks.count(attack) > 1})
  if repeated:
    raise ValueError(f'configs/table1.py names {", ".join(repeated)} twice in {arg!r}')
  for attack in attacks:
    if attack not in variants:
      raise ValueError(f'configs/table1.py has no attack {attack!r}'
                       f"{' on ' + bases[0] if bases else ''}; choose from {variants}, 'all' or "
                       f'a base of {tuple(BASES)}')
  config = base_file.get_config()
  config.runner = 'table1'
  defaults.defense_stages(config)
  if base_file is quickstart:
    # the 15-minute budget on 2 CPU cores: evaluate and checkpoint every 2 epochs
    for stage in ('backdoor_training', 'teacher', 'nad'):
      config[stage].eval_every = EVAL_EVERY
    quickstart_mcr(config)
  config.table = ml_collections.ConfigDict(dict(
      attacks=tuple(attacks), defenses=('none', 'ft', 'fp', 'mcr', 'nad'),
      attack_configs=ml_collections.ConfigDict(
          {variant: attack_sections(base_file, variant) for variant in variants}),
      figures=True, attention_images=4))
  return config
