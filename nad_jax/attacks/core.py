"""What every attack provides, and the choice of poisoned training samples."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np


class Attack(NamedTuple):
  """A backdoor attack, as pure functions applied on the device inside jit.

  trigger: (images float32 NHWC in [0, 255], PRNG key) -> triggered images.
  relabel: true labels -> the labels the backdoor should produce.
  clean_label: poison only samples whose label already is the target, keep labels.
  """
  name: str
  trigger: Callable[[jax.Array, jax.Array], jax.Array]
  relabel: Callable[[jax.Array], jax.Array]
  clean_label: bool = False


def poison_mask(labels: np.ndarray, attack: Attack, poison_rate: float,
                rng: np.random.Generator) -> np.ndarray:
  """Boolean mask of the training samples to poison, fixed by `rng`.

  Dirty-label attacks poison `poison_rate` of the whole training set, drawn from
  every class (as the official NAD code does); clean-label attacks poison
  `poison_rate` of the samples whose label is already the backdoor's target.
  """
  labels = np.asarray(labels)
  if attack.clean_label:
    candidates = np.flatnonzero(np.asarray(attack.relabel(labels)) == labels)
  else:
    candidates = np.arange(len(labels))
  count = int(round(poison_rate * len(candidates)))
  mask = np.zeros(len(labels), bool)
  mask[rng.choice(candidates, size=count, replace=False)] = True
  return mask
