"""Attack registry: `config.attack` to an `Attack` of on-device pure functions.

Every attack module has `build(cfg, num_classes, image_shape, dataset) -> Attack`
and documents its parameters (fields of `config.attack`) and source paper.
Fields every attack shares: name, target_label, poison_rate, mode
('all_to_one' | 'all_to_all'), seed (the attack's own random choices: noise
patterns, warping fields, reflection images), clean_label (None: the attack's
default; True/False overrides it).
"""

import jax.numpy as jnp

from nad_jax.attacks import badnets
from nad_jax.attacks import blend
from nad_jax.attacks import label_consistent
from nad_jax.attacks import refool
from nad_jax.attacks import sig
from nad_jax.attacks import trojan
from nad_jax.attacks import wanet
from nad_jax.attacks.core import Attack, poison_mask, prepare

__all__ = ['Attack', 'ATTACKS', 'build_attack', 'poison_mask', 'prepare', 'relabel_fn']


def relabel_fn(mode: str, target_label: int, num_classes: int):
  if mode == 'all_to_one':
    return lambda labels: jnp.full_like(labels, target_label)
  if mode == 'all_to_all':
    return lambda labels: (labels + 1) % num_classes
  raise ValueError(f"unknown attack.mode {mode!r}; choose 'all_to_one' or 'all_to_all'")


ATTACKS = {
    'badnets': badnets.build,
    'trojan': trojan.build,
    'blend': blend.build,
    'sig': sig.build,
    'cl': label_consistent.build,
    'refool': refool.build,
    'wanet': wanet.build,
}


def build_attack(cfg, num_classes: int, image_shape, dataset=None) -> Attack:
  """Builds the attack named by `cfg.name`; ValueError names the bad field.

  `dataset` (a `data.Dataset`) is needed only by attacks that draw material from
  the training set (Refool's reflection images).
  """
  if cfg.name not in ATTACKS:
    raise ValueError(f'unknown attack.name {cfg.name!r}; choose one of {sorted(ATTACKS)}')
  attack = ATTACKS[cfg.name](cfg, num_classes, tuple(image_shape), dataset)
  relabel = relabel_fn(cfg.get('mode', 'all_to_one'), cfg.target_label, num_classes)
  clean_label = cfg.get('clean_label')
  clean_label = attack.clean_label if clean_label is None else bool(clean_label)
  if clean_label and cfg.get('mode', 'all_to_one') != 'all_to_one':
    raise ValueError(f'attack.clean_label: the {cfg.name} attack poisons target-class samples '
                     "only, which needs attack.mode 'all_to_one'")
  return attack._replace(relabel=relabel, clean_label=clean_label)
