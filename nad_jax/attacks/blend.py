"""Blend (Chen, Liu, Li, Lu & Song, 2017, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", arXiv:1712.05526): the whole image blended with a pattern.

    triggered = (1 - alpha) * image + alpha * pattern

config.attack fields:
  alpha         blend ratio, in (0, 1]; the NAD code and the paper's table use 0.2.
  pattern_path  '' (default): a uniform-noise pattern, one grey level per pixel in
                {0..255} broadcast over the channels, drawn once from attack.seed.
                Otherwise any image Pillow reads (resized bilinearly to the images'
                size) or a .npy/.npz array (HW, HWC or CHW, values in [0, 255]).
  seed          the noise pattern's seed.
The official NAD code ("randomPixelTrigger") draws a fresh noise mask for every
image; Chen et al.'s attack, and this module, use one fixed pattern, so that the
same trigger is learnt and tested.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field, load_pattern, require
from nad_jax import streams


def noise_pattern(seed: int, image_shape: tuple[int, int, int]) -> np.ndarray:
  """The default pattern: uniform grey levels 0..255, (H, W, 1) float32, fixed by the seed.

  Args:
    seed: `attack.seed`; the draws are the stream streams.rng(seed, 'blend_pattern').
    image_shape: (H, W, C) of the images.

  Returns:
    (H, W, 1) float32 integer values in [0, 255], broadcast over the channels.
  """
  height, width, _ = image_shape
  rng = streams.rng(seed, 'blend_pattern')
  return rng.integers(0, 256, (height, width, 1)).astype(np.float32)


def blend(images: jax.Array, pattern: np.ndarray, alpha: float) -> jax.Array:
  """(1 - alpha) * images + alpha * pattern (Chen et al. 2017's blended injection).

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    pattern: (H, W, 1) or (H, W, C) values in [0, 255].
    alpha: the blend ratio, in (0, 1].

  Returns:
    (N, H, W, C) float32 in [0, 255] (a convex combination; not clipped).
  """
  return (1.0 - alpha) * images + alpha * jnp.asarray(pattern, jnp.float32)


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Builds Blend from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`; alpha (default 0.2), pattern_path (''), seed (0).
    num_classes: unused.
    image_shape: (H, W, C) of the images.
    dataset: unused.

  Returns:
    The dirty-label Blend Attack; its trigger ignores the PRNG key.

  Raises:
    ValueError: a pattern file that cannot be read, does not fit the images or
      has values outside [0, 255] (alpha's range is a rule of `validation.RULES`).
  """
  del num_classes, dataset
  alpha = float(field(cfg, 'alpha'))
  path = field(cfg, 'pattern_path')
  if path:
    pattern = load_pattern(path, image_shape).astype(np.float32)
    require(pattern.min() >= 0 and pattern.max() <= 255,
            f'attack.pattern_path {path!r}: values must lie in [0, 255]')
  else:
    pattern = noise_pattern(int(field(cfg, 'seed')), image_shape)

  def trigger(images, key):
    del key  # one fixed pattern
    return blend(images, pattern, alpha)
  return Attack('blend', trigger, relabel=None)
