"""Attack registry: `config.attack` to an `Attack` of on-device pure functions."""

import jax.numpy as jnp

from nad_jax.attacks import badnets
from nad_jax.attacks.core import Attack, poison_mask

__all__ = ['Attack', 'ATTACKS', 'build_attack', 'poison_mask']


def relabel_fn(mode: str, target_label: int, num_classes: int):
  if mode == 'all_to_one':
    return lambda labels: jnp.full_like(labels, target_label)
  if mode == 'all_to_all':
    return lambda labels: (labels + 1) % num_classes
  raise ValueError(f"unknown attack.mode {mode!r}; choose 'all_to_one' or 'all_to_all'")


def _badnets(cfg, num_classes, image_shape):
  return Attack('badnets',
                badnets.make_trigger(cfg.get('pattern', 'grid'), cfg.get('size', 3),
                                     cfg.get('corner', 'bottom_right'), image_shape),
                relabel_fn(cfg.get('mode', 'all_to_one'), cfg.target_label, num_classes))


ATTACKS = {'badnets': _badnets}


def build_attack(cfg, num_classes: int, image_shape) -> Attack:
  """Builds the attack named by `cfg.name`; ValueError names the bad field."""
  if cfg.name not in ATTACKS:
    raise ValueError(f'unknown attack.name {cfg.name!r}; choose one of {sorted(ATTACKS)}')
  return ATTACKS[cfg.name](cfg, num_classes, image_shape)
