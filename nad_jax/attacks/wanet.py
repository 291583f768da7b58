"""WaNet (Nguyen & Tran, 2021, "WaNet -- Imperceptible Warping-based Backdoor Attack",
ICLR, arXiv:2102.10369): a fixed, smooth image warp as the trigger.

As in the authors' code: a k x k control field of random offsets in [-1, 1]^2,
divided by its mean absolute value, is upsampled to H x W (bicubic, align-corners,
as torch.nn.functional.interpolate); the sampling grid (in [-1, 1] coordinates)
is the identity plus strength * field / H, clamped to [-1, 1]; images are resampled
bilinearly on it (torch grid_sample, align_corners=True, zero padding).

"Noise mode": cross_ratio times as many training samples as are poisoned, drawn
by attack.seed from the non-poisoned ones (a second, fixed mask), are warped with
the grid plus uniform noise in [-1, 1] / H per pixel (clamped), each with its own
noise, and keep their labels, so that the network learns this exact warp rather
than any warp. This is done once, on the devices, in the `prepare` hook (stored
rounded to uint8); the authors' code instead draws the noise-mode samples and
their noise afresh in every batch.

config.attack fields:
  warp_k         control grid size k (default 4; 2 <= k <= min(H, W)).
  warp_strength  s (default 0.5, the paper's CIFAR-10 setting; the authors'
                 grid_rescale factor is folded into it).
  cross_ratio    noise-mode samples per poisoned sample (default 2; 0 disables).
  seed           draws the control field and the noise-mode samples.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field, require
from nad_jax import streams


def cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Cubic-convolution weights of the 4 taps x0-1..x0+2 at fraction t (PyTorch's A = -0.75).

  Args:
    t: fractional positions in [0, 1), any shape.
    a: the cubic-convolution parameter (Keys 1981).

  Returns:
    t.shape + (4,) weights, summing to 1 along the last axis.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) bicubic interpolation, align_corners=True, border taps clamped.

  As torch.nn.functional.interpolate(mode='bicubic', align_corners=True).

  Args:
    size_in: the input length.
    size_out: the output length.

  Returns:
    (size_out, size_in) float64 matrix; out = matrix @ in.
  """
  src = np.arange(size_out) * (size_in - 1) / max(size_out - 1, 1)
  x0 = np.floor(src).astype(int)
  weights = cubic_weights(src - x0)
  matrix = np.zeros((size_out, size_in))
  for tap in range(4):
    np.add.at(matrix, (np.arange(size_out), np.clip(x0 - 1 + tap, 0, size_in - 1)),
              weights[:, tap])
  return matrix


def warp_grid(seed: int, k: int, strength: float, image_shape: tuple[int, int, int]
              ) -> np.ndarray:
  """The backdoor's sampling grid, (H, W, 2) float32 in [-1, 1]; [..., 0] is x (column).

  Args:
    seed: `attack.seed`; the control field is drawn from streams.rng(seed, 'wanet_field').
    k: the control grid size, 2 <= k <= min(H, W).
    strength: the warp strength s, > 0.
    image_shape: (H, W, C) of the images.

  Returns:
    (H, W, 2) float32 in [-1, 1], (x, y) per pixel.
  """
  height, width, _ = image_shape
  rng = streams.rng(seed, 'wanet_field')
  control = rng.uniform(-1.0, 1.0, (2, k, k))
  control = control / np.mean(np.abs(control))
  rows, cols = bicubic_matrix(k, height), bicubic_matrix(k, width)
  field_ = np.einsum('hk,ckl,wl->hwc', rows, control, cols)
  identity = np.stack(np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height)), -1)
  return np.clip(identity + strength * field_ / height, -1.0, 1.0).astype(np.float32)


def grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear resampling of (N, H, W, C) images at grid (N or 1, H, W, 2), align-corners,
  zero outside the image (torch grid_sample's default padding).

  Args:
    images: (N, H, W, C) float32, e.g. pixels in [0, 255].
    grid: (N or 1, H, W, 2) float32 (x, y) sampling positions in [-1, 1].

  Returns:
    (N, H, W, C) float32; in [0, 255] for images in [0, 255].
  """
  n, height, width, _ = images.shape
  x = (grid[..., 0] + 1.0) * 0.5 * (width - 1)
  y = (grid[..., 1] + 1.0) * 0.5 * (height - 1)
  x = jnp.broadcast_to(x, (n, *x.shape[1:]))
  y = jnp.broadcast_to(y, (n, *y.shape[1:]))
  x0, y0 = jnp.floor(x), jnp.floor(y)
  batch = jnp.arange(n)[:, None, None]
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      weight = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      xc = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
      yc = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
      out = out + jnp.where(inside, weight, 0.0)[..., None] * images[batch, yc, xc]
  return out


def noise_jitter(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sample `index`'s noise-mode offsets: U(-1, 1) of `shape` (H, W, 2) from fold_in(key, index).

  Args:
    key: the `prepare` hook's PRNG key.
    index: the sample's index in the training set (an integer scalar).
    shape: the output shape, (H, W, 2).

  Returns:
    float32 of `shape`, uniform in [-1, 1).
  """
  return jax.random.uniform(jax.random.fold_in(key, index), shape, minval=-1.0, maxval=1.0)


@jax.jit
def noise_warp(grid: jax.Array, images: jax.Array, key: jax.Array, indices: jax.Array
               ) -> jax.Array:
  """Noise mode: each uint8 image warped by grid + noise_jitter / H of its own, to uint8.

  Args:
    grid: (1, H, W, 2) float32 backdoor grid from `warp_grid`.
    images: (N, H, W, C) uint8 in [0, 255].
    key: PRNG key.
    indices: (N,) int training-set indices; each image's noise comes from
      fold_in(key, index).

  Returns:
    (N, H, W, C) uint8, rounded and clipped to [0, 255].
  """
  height = images.shape[1]
  jitter = jax.vmap(lambda i: noise_jitter(key, i, grid.shape[1:]))(indices)
  warped = grid_sample(images.astype(jnp.float32), jnp.clip(grid + jitter / height, -1.0, 1.0))
  return jnp.clip(jnp.round(warped), 0, 255).astype(jnp.uint8)


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Builds WaNet (Nguyen & Tran, ICLR 2021) from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`; warp_k (4), warp_strength (0.5), cross_ratio (2), seed (0).
    num_classes: unused.
    image_shape: (H, W, C) of the images.
    dataset: unused.

  Returns:
    The dirty-label WaNet Attack; its trigger ignores the PRNG key. With
    cross_ratio > 0 its `prepare` warps the noise-mode samples in place.

  Raises:
    ValueError: warp_k above min(H, W) (each field's own range, warp_k >= 2
      included, is a rule of `validation.RULES`).
  """
  del num_classes, dataset
  k = int(field(cfg, 'warp_k'))
  require(k <= min(image_shape[:2]), f'attack.warp_k {k} exceeds the {image_shape[0]}x'
          f'{image_shape[1]} images: at most {min(image_shape[:2])} control points a side')
  strength = float(field(cfg, 'warp_strength'))
  cross_ratio = float(field(cfg, 'cross_ratio'))
  grid = jnp.asarray(warp_grid(int(field(cfg, 'seed')), k, strength, image_shape))[None]

  def trigger(images, key):
    del key  # one fixed warp
    return grid_sample(images, grid)

  def prepare(images, labels, poisoned, key):
    clean = np.flatnonzero(~poisoned)
    count = min(int(round(cross_ratio * poisoned.sum())), len(clean))
    if not count:
      return images, labels, poisoned
    chosen = np.sort(streams.rng(field(cfg, 'seed'), 'wanet_noise_mode').choice(
        clean, count, replace=False))
    out = images.copy()
    batch = 256
    for start in range(0, count, batch):
      idx = chosen[start:start + batch]
      pad = np.concatenate([idx, np.repeat(idx[:1], batch - len(idx))])
      warped = noise_warp(grid, jnp.asarray(images[pad]), key, jnp.asarray(pad))
      out[idx] = np.asarray(warped)[:len(idx)]
    return out, labels, poisoned

  return Attack('wanet', trigger, relabel=None, prepare=prepare if cross_ratio > 0 else None)
