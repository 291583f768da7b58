"""Every random stream of a run, by name, derived from one seed.

A stream is a numpy Generator or a JAX PRNG key made from (seed, name). The
name enters as its CRC-32, so streams of different names are independent, a
name draws the same numbers in every run, and no stream of seed s equals a
stream of seed s + 1 (as `key(seed + 1)` for a second model would). `config.seed`
feeds the run's streams, `attack.seed` the attack's own draws.
"""

import zlib

import jax
import numpy as np

# name -> what it draws. Only these names are accepted, so every stream is listed here.
STREAMS = {
    # from config.seed
    'synthetic_data': 'the synthetic dataset: class textures, boxes, shifts, noise',
    'clean_subset': "which training images the defender holds (data.clean_fraction)",
    'poisoned_indices': 'which training images the attack poisons (attack.poison_rate)',
    'victim_init': "the backdoored model's initialisation",
    'scratch_teacher_init': "the initialisation of a teacher trained from scratch",
    'attack_prepare': "Attack.prepare: CL's surrogate training and PGD",
    'backdoored': 'the backdoor training: batch order, augmentation, training triggers',
    'teacher': "the teacher's fine-tuning: batch order, augmentation",
    'nad': 'NAD, FT and FP fine-tuning: batch order, augmentation (one stream: same batches)',
    'mcr': "MCR's curve training: batch order, augmentation, t per step",
    'fp_holdout': "fine-pruning's held-out part of the clean subset",
    'evaluation': 'the triggers of the poisoned test pass (the same at every evaluation)',
    # from attack.seed
    'blend_pattern': "Blend's noise pattern",
    'trojan_patch': "Trojan's generated patch: the random model and the patch's start",
    'wanet_field': "WaNet's warp control field",
    'wanet_noise_mode': "WaNet's noise-mode training images",
    'refool_reflections': "Refool's reflection images: natural crops or held-out training images",
    'refool_selection': "Refool's reflection selection: held-out images, poisoning, models, ties",
}


def _salt(name: str) -> int:
  if name not in STREAMS:
    raise KeyError(f'unknown random stream {name!r}; nad_jax.streams.STREAMS names them all')
  return zlib.crc32(name.encode())


def rng(seed: int, name: str) -> np.random.Generator:
  """The numpy generator of stream `name` under `seed`.

  Args:
    seed: a non-negative int (`config.seed` or `attack.seed`).
    name: a key of STREAMS.

  Returns:
    np.random.default_rng([seed, crc32(name)]).

  Raises:
    KeyError: `name` is not in STREAMS.
  """
  return np.random.default_rng([int(seed), _salt(name)])


def key(seed: int, name: str) -> jax.Array:
  """The JAX PRNG key of stream `name` under `seed`.

  Args:
    seed: a non-negative int (`config.seed` or `attack.seed`).
    name: a key of STREAMS.

  Returns:
    fold_in(key(seed), crc32(name)): a typed key array, shape ().

  Raises:
    KeyError: `name` is not in STREAMS.
  """
  return jax.random.fold_in(jax.random.key(int(seed)), _salt(name))
