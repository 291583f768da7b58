"""BadNets (Gu et al., 2017): a small patch stamped into a corner of the image.

`grid` is the official NAD trigger: a 3x3 pattern in the bottom-right corner,
[[0, 0, 255], [0, 255, 0], [255, 0, 255]] (top row first), equal in all channels.
`square` is a solid white patch of `size` x `size`.
"""

import jax
import jax.numpy as jnp
import numpy as np

GRID = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.float32)
CORNERS = ('bottom_right', 'bottom_left', 'top_right', 'top_left')


def patch(pattern: str, size: int) -> np.ndarray:
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
