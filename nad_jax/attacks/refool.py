"""Refool, reflection backdoor (Liu, Ma, Bailey & Lu, 2020, "Reflection Backdoor: A Natural
Backdoor Attack on Deep Neural Networks", ECCV, arXiv:2007.02343).

The trigger is a reflection: an image r from a fixed set of reflection images is
superimposed on the image x through one of the two physical models of the
authors' `blend_images` (from Zhang et al.'s reflection synthesis), in linear
light (t = (x/255)^2.2, r^2.2), and the result is taken back by the power 1/2.2,
clipped, times 255. Per sample, the key draws the reflection image, the model and
its parameters; alpha_t = 1 - U(reflection_strength) (default U(0.05, 0.45)).

- ghost (probability ghost_rate): a double image, r and r shifted by an offset
  (dy, dx), each in U{3..8}: ghost[i, j] = a * r[i + dy, j + dx] + (1 - a) * r[i, j],
  a ~ U(0, 1), on the (H - dy) x (W - dx) overlap (the authors' pad-both-ways-and-
  crop), resized back to H x W bilinearly (cv2 INTER_LINEAR, half-pixel centres);
  blend = alpha_t * t + (1 - alpha_t) * ghost.
- out-of-focus (otherwise): r blurred by a Gaussian of sigma ~ U(1, 5), kernel
  2*ceil(2 sigma)+1, reflect-101 borders (cv2.GaussianBlur); each channel is
  pulled down by (m_c - 1) * att, att ~ 1.08 + U(0, 0.1), where m_c is the mean of
  blur + t over its pixels above 1 (at least 1), and clipped to [0, 1]; it is
  attenuated by a random 32x32 window g of the authors' 560 x 560 vignette (a
  3-sigma Gaussian) times (1 - alpha_t / 2): blend = alpha_t * t + g * blur.
The authors' code picks the ghost model when a standard normal draw is below
0.49, i.e. with probability 0.69: the default ghost_rate.

Reflection images: by default `reflections` training images, drawn by
attack.seed from the non-target classes and held out (the `prepare` hook removes
them from the victim's training set), as stand-ins for the paper's PascalVOC
images; or every image in the folder `pattern_path` (resized bilinearly). The
paper's adversarial selection of the most effective reflections is not done.

config.attack fields: reflections (default 200), pattern_path (a folder, or ''),
ghost_rate (0.69), reflection_strength ((0.05, 0.45)), clean_label (None/True:
clean-label, the default; False: dirty-label, every class poisoned and relabelled).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field, require
from nad_jax import streams

GAMMA = 2.2
CANVAS = 560  # the authors' max_image_size: the vignette's size
MAX_RADIUS = 10  # ceil(2 * sigma) for sigma <= 5


def vignette_profile() -> np.ndarray:
  """The 1-D factor of the authors' gen_kernel(560, 3), normalised to a peak of 1.

  Returns:
    (CANVAS,) float32 in (0, 1]; the vignette is its outer product with itself.
  """
  interval = 7.0 / CANVAS
  x = np.linspace(-3 - interval / 2, 3 + interval / 2, CANVAS + 1)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  kern = np.diff(cdf)
  return np.sqrt(kern / kern.max()).astype(np.float32)


def reflect101(index: np.ndarray, size: int) -> np.ndarray:
  """Maps out-of-range indices into [0, size) by reflect-101 (cv2.BORDER_REFLECT_101).

  Args:
    index: integer indices in (-size, 2 * size - 1).
    size: the axis length.

  Returns:
    The reflected indices, same shape.
  """
  index = np.abs(index)
  return np.where(index > size - 1, 2 * (size - 1) - index, index)


def draw(key: jax.Array, n: int, num_reflections: int, ghost_rate: float,
         strength: tuple[float, float], image_shape: tuple[int, int, int]) -> dict:
  """Per-sample draws (arrays of length N): index, ghost, alpha_t, offset (N, 2),
  ghost_alpha, sigma, att, window (N, 2).

  Args:
    key: PRNG key.
    n: the number of samples N.
    num_reflections: the size of the reflection bank.
    ghost_rate: probability of the ghost model, in [0, 1].
    strength: (low, high) in [0, 1]; alpha_t = 1 - U(low, high).
    image_shape: (H, W, C) of the images; bounds the vignette window.

  Returns:
    {index: int32 in [0, num_reflections), ghost: bool, alpha_t: float32,
    offset: int32 (N, 2) in [3, 8], ghost_alpha: float32 in [0, 1), sigma: float32
    in [1, 5), att: float32 in [1.08, 1.18), window: int32 (N, 2) (row, col) origin
    in the CANVAS x CANVAS vignette}.
  """
  height, width, _ = image_shape
  ks = jax.random.split(key, 8)
  return dict(
      index=jax.random.randint(ks[0], (n,), 0, num_reflections),
      ghost=jax.random.bernoulli(ks[1], ghost_rate, (n,)),
      alpha_t=1.0 - jax.random.uniform(ks[2], (n,), minval=strength[0], maxval=strength[1]),
      offset=jax.random.randint(ks[3], (n, 2), 3, 9),
      ghost_alpha=jax.random.uniform(ks[4], (n,)),
      sigma=jax.random.uniform(ks[5], (n,), minval=1.0, maxval=5.0),
      att=1.08 + jax.random.uniform(ks[6], (n,)) / 10.0,
      window=jax.random.randint(ks[7], (n, 2), 0,
                                jnp.array([CANVAS - height - 10, CANVAS - width - 10])))


def _shift_and_resize(size: int, offset):
  """(N, size, size) matrices: the shift k -> k + offset (zero beyond the edge), and the
  bilinear resize (cv2, half-pixel centres) of the first size - offset entries to size."""
  k = jnp.arange(size)
  shift = jax.nn.one_hot(k[None] + offset[:, None], size)
  cropped = (size - offset).astype(jnp.float32)[:, None]  # source length
  src = jnp.clip((k[None] + 0.5) * cropped / size - 0.5, 0.0, cropped - 1)
  x0 = jnp.floor(src)
  w1 = src - x0
  x1 = jnp.minimum(x0 + 1, cropped - 1)
  resize = ((1 - w1)[..., None] * jax.nn.one_hot(x0.astype(jnp.int32), size)
            + w1[..., None] * jax.nn.one_hot(x1.astype(jnp.int32), size))
  return shift, resize


def _blur_matrix(size: int, sigma):
  """(N, size, size) Gaussian blur, kernel 2*ceil(2 sigma)+1, reflect-101 borders."""
  d = np.arange(-MAX_RADIUS, MAX_RADIUS + 1)
  taps = jnp.asarray(np.eye(size)[reflect101(np.arange(size)[:, None] + d[None], size)],
                     jnp.float32)  # (size, taps, size)
  radius = jnp.ceil(2 * sigma)[:, None]
  w = jnp.where(jnp.abs(d)[None] <= radius, jnp.exp(-(d[None] ** 2) / (2 * sigma[:, None] ** 2)),
                0.0)
  w = w / jnp.sum(w, axis=1, keepdims=True)
  return jnp.einsum('nd,idj->nij', w, taps)


def reflect(images: jax.Array, bank: jax.Array, p: dict, profile: jax.Array) -> jax.Array:
  """Blends reflections into (N, H, W, C) images in [0, 255] with the draws `p`.

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    bank: (R, H, W, C) float32 reflection images in linear light, (r / 255)^2.2 in [0, 1].
    p: the draws of `draw` for these N images.
    profile: (CANVAS,) float32 `vignette_profile()`.

  Returns:
    (N, H, W, C) float32 in [0, 255].
  """
  n, height, width, _ = images.shape
  t = (images / 255.0) ** GAMMA
  r = bank[p['index']]
  alpha_t = p['alpha_t'][:, None, None, None]

  sv, rv = _shift_and_resize(height, p['offset'][:, 0])
  sh, rh = _shift_and_resize(width, p['offset'][:, 1])
  a = p['ghost_alpha'][:, None, None, None]
  mixed = a * jnp.einsum('nij,njkc,nlk->nilc', sv, r, sh) + (1 - a) * r
  ghost = jnp.einsum('nij,njkc,nlk->nilc', rv, mixed, rh)
  ghost_blend = alpha_t * t + (1 - alpha_t) * ghost

  bv, bh = _blur_matrix(height, p['sigma']), _blur_matrix(width, p['sigma'])
  blur = jnp.einsum('nij,njkc,nlk->nilc', bv, r, bh)
  total = blur + t
  above = total > 1
  mean = jnp.maximum(1.0, jnp.sum(total * above, axis=(1, 2)) / (jnp.sum(above, axis=(1, 2)) + 1e-6))
  blur = jnp.clip(blur - (mean - 1)[:, None, None, :] * p['att'][:, None, None, None], 0.0, 1.0)
  rows = jax.vmap(lambda o: jax.lax.dynamic_slice(profile, (o,), (height,)))(p['window'][:, 0])
  cols = jax.vmap(lambda o: jax.lax.dynamic_slice(profile, (o,), (width,)))(p['window'][:, 1])
  g = rows[:, :, None, None] * cols[:, None, :, None] * (1 - alpha_t / 2)
  focus_blend = alpha_t * t + g * blur

  blended = jnp.where(p['ghost'][:, None, None, None], ghost_blend, focus_blend)
  return jnp.clip(jnp.maximum(blended, 0.0) ** (1 / GAMMA), 0.0, 1.0) * 255.0


def heldout_indices(labels: np.ndarray, target: int, count: int, seed: int) -> np.ndarray:
  """The training images held out as reflections: `count` drawn from the non-target classes.

  Args:
    labels: (N,) integer training labels.
    target: `attack.target_label`.
    count: `attack.reflections`.
    seed: `attack.seed`; the draws are the stream streams.rng(seed, 'refool_reflections').

  Returns:
    (count,) sorted int64 indices into the training set.

  Raises:
    ValueError: fewer than `count` non-target images.
  """
  candidates = np.flatnonzero(np.asarray(labels) != target)
  require(count <= len(candidates), f'attack.reflections {count} exceeds the '
          f'{len(candidates)} non-target training images')
  rng = streams.rng(seed, 'refool_reflections')
  return np.sort(rng.choice(candidates, count, replace=False))


def load_folder(path: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """Every image Pillow reads in the folder `path`, resized bilinearly to the images' size.

  Hidden files are skipped, and so are files Pillow cannot open (OSError).

  Args:
    path: the folder (`attack.pattern_path`).
    image_shape: (H, W, C) of the images; C = 1 reads greyscale, else RGB.

  Returns:
    (R, H, W, C) float32 in [0, 255], in file-name order.

  Raises:
    ValueError: no readable image in the folder.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width, channels = image_shape
  names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
  images = []
  for name in names:
    try:
      with Image.open(os.path.join(path, name)) as image:
        image = image.convert('L' if channels == 1 else 'RGB').resize((width, height),
                                                                      Image.BILINEAR)
        images.append(np.asarray(image, np.float32).reshape(height, width, channels))
    except OSError:
      continue  # not an image
  require(bool(images), f'attack.pattern_path {path!r} holds no readable image')
  return np.stack(images)


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Builds Refool (Liu et al., ECCV 2020) from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`.
    num_classes: unused.
    image_shape: (H, W, C) of the images.
    dataset: a `data.Dataset`; needed (its uint8 training images and labels)
      unless `pattern_path` names a folder of reflection images.

  Returns:
    A clean-label Attack whose trigger draws a reflection per image from its
    PRNG key; with reflections taken from the training set, its `prepare`
    removes them from the victim's training set.

  Raises:
    ValueError: images of at most MAX_RADIUS pixels a side, a pattern_path that is
      not a folder or holds no readable image, no dataset and no pattern_path, or
      more reflections than non-target training images (each field's own range is
      a rule of `validation.RULES`).
  """
  del num_classes
  ghost_rate = float(field(cfg, 'ghost_rate'))
  strength = tuple(float(s) for s in field(cfg, 'reflection_strength'))
  require(min(image_shape[:2]) > MAX_RADIUS,
          f'refool needs images larger than {MAX_RADIUS} pixels, got {image_shape}')
  path = field(cfg, 'pattern_path')
  heldout = None
  if path:
    require(os.path.isdir(path), f'attack.pattern_path {path!r} is not a directory '
            '(refool reads its reflection images from a folder)')
    bank = load_folder(path, image_shape)
  else:
    count = int(field(cfg, 'reflections'))
    require(dataset is not None, 'attack.name refool draws its reflection images from the '
            'training set: pass the dataset to build_attack, or set attack.pattern_path')
    heldout = heldout_indices(dataset.train_labels, cfg.target_label, count,
                              int(field(cfg, 'seed')))
    bank = dataset.train_images[heldout].astype(np.float32)
  bank = jnp.asarray((bank / 255.0) ** GAMMA, jnp.float32)
  profile = jnp.asarray(vignette_profile())

  def trigger(images, key):
    p = draw(key, images.shape[0], bank.shape[0], ghost_rate, strength, image_shape)
    return reflect(images, bank, p, profile)

  def prepare(images, labels, poisoned, key):
    del key
    keep = np.ones(len(images), bool)
    keep[heldout] = False
    return images[keep], labels[keep], poisoned[keep]

  return Attack('refool', trigger, relabel=None, clean_label=True,
                prepare=prepare if heldout is not None else None)
