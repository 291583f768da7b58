"""BadNets (Gu, Dolan-Gavitt & Garg, 2017, arXiv:1708.06733): a small patch stamped into a corner.

`grid` is the official NAD trigger: a 3x3 pattern in the bottom-right corner,
[[0, 0, 255], [0, 255, 0], [255, 0, 255]] (top row first), equal in all channels.
`square` is a solid white patch of `size` x `size`.

config.attack fields: pattern ('grid' | 'square'), size (3 for grid), corner
('bottom_right' | 'bottom_left' | 'top_right' | 'top_left'), mode ('all_to_one':
every poisoned sample -> target_label; 'all_to_all': label y -> (y + 1) mod classes).
"""

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field

GRID = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.float32)
CORNERS = ('bottom_right', 'bottom_left', 'top_right', 'top_left')


def patch(pattern: str, size: int) -> np.ndarray:
  if size < 1:
    raise ValueError(f'attack.size must be >= 1, got {size}')
  if pattern == 'grid':
    if size != 3:
      raise ValueError(f'the grid pattern is 3x3; attack.size must be 3, got {size}')
    return GRID
  if pattern == 'square':
    return np.full((size, size), 255, np.float32)
  raise ValueError(f"unknown attack.pattern {pattern!r}; choose 'grid' or 'square'")


def corner_origin(corner: str, size: int, height: int, width: int) -> tuple[int, int]:
  if corner not in CORNERS:
    raise ValueError(f'unknown attack.corner {corner!r}; choose one of {CORNERS}')
  if size > min(height, width):
    raise ValueError(f'attack.size {size} exceeds the {height}x{width} images')
  row = height - size if corner.startswith('bottom') else 0
  col = width - size if corner.endswith('right') else 0
  return row, col


def stamp(images: jax.Array, values: np.ndarray, row: int, col: int) -> jax.Array:
  """Sets images[:, row:row+h, col:col+w, :] to `values` (h, w), in every channel."""
  h, w = values.shape
  return images.at[:, row:row + h, col:col + w, :].set(jnp.asarray(values)[None, :, :, None])


def make_trigger(pattern: str, size: int, corner: str, image_shape):
  values = patch(pattern, size)
  row, col = corner_origin(corner, size, *image_shape[:2])

  def trigger(images, key):
    del key  # the patch is fixed
    return stamp(images, values, row, col)
  return trigger


def build(cfg, num_classes, image_shape, dataset=None):
  """Fields: pattern ('grid' | 'square'), size, corner (see CORNERS)."""
  del num_classes, dataset
  trigger = make_trigger(field(cfg, 'pattern', 'grid'), field(cfg, 'size', 3),
                         field(cfg, 'corner', 'bottom_right'), image_shape)
  return Attack('badnets', trigger, relabel=None)
