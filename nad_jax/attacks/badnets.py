"""BadNets (Gu, Dolan-Gavitt & Garg, 2017, arXiv:1708.06733): a small patch stamped into a corner.

`grid` is the official NAD trigger: a 3x3 pattern in the bottom-right corner,
[[0, 0, 255], [0, 255, 0], [255, 0, 255]] (top row first), equal in all channels.
`square` is a solid white patch of `size` x `size`.

config.attack fields: pattern ('grid' | 'square'), size (3 for grid), corner
('bottom_right' | 'bottom_left' | 'top_right' | 'top_left'), mode ('all_to_one':
every poisoned sample -> target_label; 'all_to_all': label y -> (y + 1) mod classes).
Their allowed values are checked by `validation.RULES`; this module checks only
what needs the images (a patch larger than them) and the grid's fixed size.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field

GRID = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.float32)
CORNERS = ('bottom_right', 'bottom_left', 'top_right', 'top_left')


def patch(pattern: str, size: int) -> np.ndarray:
  """The trigger patch's pixel values.

  Args:
    pattern: 'grid' (the official NAD 3x3 pattern, GRID) or 'square' (solid white).
    size: the patch side in pixels; must be 3 for 'grid'.

  Returns:
    (size, size) float32 values in {0, 255}.

  Raises:
    ValueError: a grid of size other than 3.
  """
  if pattern == 'square':
    return np.full((size, size), 255, np.float32)
  if size != 3:
    raise ValueError(f'the grid pattern is 3x3; attack.size must be 3, got {size}')
  return GRID


def corner_origin(corner: str, size: int, height: int, width: int) -> tuple[int, int]:
  """The top-left pixel of a `size` x `size` patch flush with `corner`.

  Args:
    corner: one of CORNERS.
    size: the patch side in pixels.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    (row, col) of the patch's top-left pixel.

  Raises:
    ValueError: a patch larger than the image.
  """
  if size > min(height, width):
    raise ValueError(f'attack.size {size} exceeds the {height}x{width} images')
  row = height - size if corner.startswith('bottom') else 0
  col = width - size if corner.endswith('right') else 0
  return row, col


def stamp(images: jax.Array, values: np.ndarray, row: int, col: int) -> jax.Array:
  """Sets images[:, row:row+h, col:col+w, :] to `values` (h, w), in every channel.

  Args:
    images: (N, H, W, C) float32 images in [0, 255].
    values: (h, w) pixel values in [0, 255].
    row: the patch's top row.
    col: the patch's left column.

  Returns:
    The stamped images, same shape and dtype.
  """
  h, w = values.shape
  return images.at[:, row:row + h, col:col + w, :].set(jnp.asarray(values)[None, :, :, None])


def make_trigger(pattern: str, size: int, corner: str, image_shape: tuple[int, int, int]
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The BadNets trigger function (Gu et al. 2017): a fixed patch stamped into a corner.

  Args:
    pattern: 'grid' or 'square' (see `patch`).
    size: the patch side in pixels.
    corner: one of CORNERS.
    image_shape: (H, W, C) of the images.

  Returns:
    trigger(images, key) -> images: (N, H, W, C) float32 in [0, 255] in and out;
    the PRNG key is ignored.

  Raises:
    ValueError: as `patch` and `corner_origin`.
  """
  values = patch(pattern, size)
  row, col = corner_origin(corner, size, *image_shape[:2])

  def trigger(images, key):
    del key  # the patch is fixed
    return stamp(images, values, row, col)
  return trigger


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Fields: pattern ('grid' | 'square'), size, corner (see CORNERS).

  Args:
    cfg: `config.attack`; pattern (default 'grid'), size (3), corner ('bottom_right').
    num_classes: unused.
    image_shape: (H, W, C) of the images.
    dataset: unused.

  Returns:
    The dirty-label BadNets Attack; `build_attack` sets its relabel.

  Raises:
    ValueError: as `make_trigger`.
  """
  del num_classes, dataset
  trigger = make_trigger(field(cfg, 'pattern'), field(cfg, 'size'),
                         field(cfg, 'corner'), image_shape)
  return Attack('badnets', trigger, relabel=None)
