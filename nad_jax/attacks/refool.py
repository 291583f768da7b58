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

Reflection images (`reflection_source`):
- 'natural' (the default): random crops of natural photographs from outside the
  victim's data, the public-domain / CC0 pictures scikit-image ships inside its
  wheel (NATURAL_IMAGES; `pip install 'nad-jax[refool]'`), as stand-ins for the
  paper's PascalVOC images. A crop is an H:W window of side U{min/4 .. min} of the
  photo's shorter side at a uniform position, resized to H x W (Pillow bilinear),
  all drawn by attack.seed. No training image is used or removed.
- 'heldout': training images drawn by attack.seed from the non-target classes and
  held out (the `prepare` hook removes them from the victim's training set).
- `pattern_path` (a folder) overrides both: every image in it (resized bilinearly).

Adversarial reflection selection (the paper's Sec. 3.2, Algorithm 1; arXiv:2007.02343;
sizes from the authors' code, github.com/DreamtaleCore/Refool strategy.py):
a candidate set R_cand of `reflection_candidates` images (2000) gets scores W = 1;
each of `selection_rounds` rounds (16) takes the top m = `reflections` (200) by W
(ties in random order) as R_adv, poisons the training set with R_adv (target-class
images at `poison_rate`, each blended with a reflection of R_adv drawn at random),
trains a model on it from scratch, and scores each r in R_adv by the number of
held-out non-target images (`selection_holdout`, 1000, training images left out of
that model's training, not of the victim's) the model assigns to the target class
when r is blended into them; W = those counts on R_adv and their median on every
other candidate (the authors' update). R_adv of the last round is the trigger's bank.
The model is `attack.surrogate` (as CL's: model, epochs, batch_size, learning_rate,
lr_boundaries, crop_flip) trained by the engine's `fit`, handed in. The selection
runs once, when the attack is built (the trigger needs its bank before any
training or evaluation, and every seed of a run shares it): its draws come from
attack.seed. `selection_rounds` 0 skips it: the bank is then `reflections` images
(or the whole folder).

config.attack fields: reflection_source ('natural'), reflections (200),
reflection_candidates (2000), selection_rounds (16), selection_holdout (1000),
surrogate (the selection's model), pattern_path (a folder, or ''), ghost_rate
(0.69), reflection_strength ((0.05, 0.45)), clean_label (None/True: clean-label, the
default; False: dirty-label, every class poisoned and relabelled).
"""

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.attacks import label_consistent
from nad_jax.attacks.core import Attack, field, require
from nad_jax import streams

GAMMA = 2.2
CANVAS = 560  # the authors' max_image_size: the vignette's size
MAX_RADIUS = 10  # ceil(2 * sigma) for sigma <= 5
SOURCES = ('natural', 'heldout')
# scikit-image's bundled photographs (skimage.data) with no copyright restrictions: public
# domain (astronaut, hubble_deep_field, rocket, coins, immunohistochemistry) or CC0 (camera,
# chelsea, coffee, brick, grass, gravel). Greyscale ones are used as grey RGB.
NATURAL_IMAGES = ('astronaut', 'brick', 'camera', 'chelsea', 'coffee', 'coins', 'grass',
                  'gravel', 'hubble_deep_field', 'immunohistochemistry', 'rocket')
INSTALL = "pip install 'nad-jax[refool]' (or pip install scikit-image)"


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
  mean = jnp.maximum(1.0, jnp.sum(total * above, axis=(1, 2))
                     / (jnp.sum(above, axis=(1, 2)) + 1e-6))
  blur = jnp.clip(blur - (mean - 1)[:, None, None, :] * p['att'][:, None, None, None], 0.0, 1.0)
  rows = jax.vmap(lambda o: jax.lax.dynamic_slice(profile, (o,), (height,)))(p['window'][:, 0])
  cols = jax.vmap(lambda o: jax.lax.dynamic_slice(profile, (o,), (width,)))(p['window'][:, 1])
  g = rows[:, :, None, None] * cols[:, None, :, None] * (1 - alpha_t / 2)
  focus_blend = alpha_t * t + g * blur

  blended = jnp.where(p['ghost'][:, None, None, None], ghost_blend, focus_blend)
  return jnp.clip(jnp.maximum(blended, 0.0) ** (1 / GAMMA), 0.0, 1.0) * 255.0


def heldout_indices(labels: np.ndarray, target: int, count: int, seed: int,
                    field_name: str = 'attack.reflections') -> np.ndarray:
  """The training images held out as reflections: `count` drawn from the non-target classes.

  Args:
    labels: (N,) integer training labels.
    target: `attack.target_label`.
    count: how many (`attack.reflections`, or `attack.reflection_candidates` when the
      reflections are selected from them).
    seed: `attack.seed`; the draws are the stream streams.rng(seed, 'refool_reflections').
    field_name: the config field `count` comes from, for the message.

  Returns:
    (count,) sorted int64 indices into the training set.

  Raises:
    ValueError: fewer than `count` non-target images.
  """
  candidates = np.flatnonzero(np.asarray(labels) != target)
  require(count <= len(candidates), f'{field_name} {count} exceeds the '
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


def natural_photos() -> list[np.ndarray]:
  """The photographs of NATURAL_IMAGES, as scikit-image ships them (no download).

  Returns:
    A list of (h, w) or (h, w, 3) uint8 arrays, in NATURAL_IMAGES order.

  Raises:
    ValueError: scikit-image is not installed (the message names the field and the
      pip command).
  """
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("attack.reflection_source 'natural' crops the photographs scikit-image "
                     f"ships, and scikit-image is not installed: {INSTALL}; or set "
                     "attack.reflection_source='heldout'") from None
  return [np.asarray(getattr(data, name)()) for name in NATURAL_IMAGES]


def natural_crops(photos: list[np.ndarray], count: int, image_shape: tuple[int, int, int],
                  seed: int) -> np.ndarray:
  """`count` random crops of `photos`, resized to the images' size: the natural reflection bank.

  Each crop draws a photo uniformly, a height U{s/4 .. s} with s the largest height whose
  H:W window fits the photo, and a uniform position; Pillow resizes it bilinearly
  (antialiased) to H x W.

  Args:
    photos: (h, w) or (h, w, 3) uint8 arrays (`natural_photos()`).
    count: the number of crops.
    image_shape: (H, W, C) of the images; C = 1 reads greyscale, else RGB.
    seed: `attack.seed`; the draws are the stream streams.rng(seed, 'refool_reflections').

  Returns:
    (count, H, W, C) float32 in [0, 255]; the same for the same arguments.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width, channels = image_shape
  rng = streams.rng(seed, 'refool_reflections')
  crops = []
  for _ in range(count):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    most = min(h, w * height // width)  # the tallest H:W window of the photo
    crop_h = int(rng.integers(max(1, most // 4), most + 1))
    crop_w = max(1, min(w, round(crop_h * width / height)))
    top, left = int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    image = image.convert('L' if channels == 1 else 'RGB').resize((width, height),
                                                                  Image.BILINEAR)
    crops.append(np.asarray(image, np.float32).reshape(height, width, channels))
  return np.stack(crops)


def top_m(scores: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
  """The indices of the `m` highest scores, highest first; ties in random order.

  Args:
    scores: (K,) float scores W.
    m: how many, at most K.
    rng: draws the order among equal scores.

  Returns:
    (m,) int64 indices into `scores`.
  """
  return np.lexsort((rng.random(len(scores)), -np.asarray(scores)))[:m]


def update_scores(num_candidates: int, chosen: np.ndarray, chosen_scores: np.ndarray
                  ) -> np.ndarray:
  """Refool's score update: the chosen candidates' scores, their median everywhere else.

  Args:
    num_candidates: K.
    chosen: (m,) indices of R_adv in the candidate set.
    chosen_scores: (m,) their scores (attack successes).

  Returns:
    (K,) float64 scores W.
  """
  scores = np.full(num_candidates, float(np.median(chosen_scores)))
  scores[chosen] = chosen_scores
  return scores


def select(num_candidates: int, m: int, rounds: int,
           score: Callable[[np.ndarray, int], np.ndarray], rng: np.random.Generator
           ) -> np.ndarray:
  """Refool's adversarial reflection selection (Liu et al. 2020, Algorithm 1).

  W starts at 1 for every candidate; each round takes R_adv = `top_m(W, m)`, scores it
  and updates W by `update_scores`. A candidate that scores above the round's median
  stays in R_adv; the others make room for candidates not yet tried.

  Args:
    num_candidates: K, the size of R_cand.
    m: the size of R_adv, at most K.
    rounds: the number of rounds, >= 1.
    score: (indices of R_adv (m,), round) -> (m,) scores, higher = more effective.
    rng: draws the order among equal scores.

  Returns:
    (m,) int64 indices of the last round's R_adv into the candidate set.
  """
  scores = np.ones(num_candidates)
  for round_ in range(rounds):
    chosen = top_m(scores, m, rng)
    scores = update_scores(num_candidates, chosen, np.asarray(score(chosen, round_), float))
  return chosen


def make_blend(ghost_rate: float, strength: tuple[float, float],
               image_shape: tuple[int, int, int]) -> Callable:
  """The trigger for any bank: `reflect` with the draws of `draw`.

  Args:
    ghost_rate: `attack.ghost_rate`.
    strength: `attack.reflection_strength`.
    image_shape: (H, W, C) of the images.

  Returns:
    blend(images (N, H, W, C) float32 in [0, 255], bank (R, H, W, C) in linear light,
    key) -> (N, H, W, C) float32 in [0, 255]; pure and jittable.
  """
  profile = jnp.asarray(vignette_profile())

  def blend(images, bank, key):
    return reflect(images, bank, draw(key, images.shape[0], bank.shape[0], ghost_rate,
                                      strength, image_shape), profile)
  return blend


def to_linear(images: np.ndarray) -> jax.Array:
  """Reflection images in [0, 255] to the bank `reflect` takes: (r / 255)^2.2, float32."""
  return jnp.asarray((np.asarray(images, np.float32) / 255.0) ** GAMMA, jnp.float32)


def success_scorer(model, train_model: Callable, images: np.ndarray, labels: np.ndarray,
                   holdout: np.ndarray, candidates: jax.Array, target: int, poison_rate: float,
                   blend: Callable, key: jax.Array, batch: int = 256
                   ) -> Callable[[np.ndarray, int], np.ndarray]:
  """The score of Algorithm 1: attack successes of a model trained on data poisoned by R_adv.

  Args:
    model: the Flax module trained each round.
    train_model: (images uint8, labels, key) -> trained variables of `model` (inputs
      scaled to pixels / 255, as `nad_jax.train.fit`).
    images: (N, H, W, C) uint8 training images.
    labels: (N,) int32 labels.
    holdout: (V,) indices of non-target training images the model does not train on:
      the images each reflection is scored on.
    candidates: (K, H, W, C) float32 candidate bank in linear light (`to_linear`).
    target: the target label.
    poison_rate: the share of target-class training images poisoned each round.
    blend: `make_blend(...)`: the trigger with a given bank.
    key: PRNG key; round r uses fold_in(key, r).
    batch: images blended per jitted call when poisoning.

  Returns:
    score(chosen (m,), round) -> (m,) int64: for each reflection of R_adv, how many of the
    V held-out images the round's model classifies as `target` once it is blended in.
  """
  train = np.setdiff1d(np.arange(len(images)), holdout)
  targets = train[labels[train] == target]
  count = int(round(poison_rate * len(targets)))
  val = jnp.asarray(images[holdout], jnp.float32)
  blend_jit = jax.jit(blend)

  @jax.jit
  def successes(variables, bank, k):
    def one(j):
      reflected = blend(val, bank[j][None], jax.random.fold_in(k, j))
      logits = model.apply(variables, reflected / 255.0, train=False)
      return jnp.sum(jnp.argmax(logits, -1) == target)
    return jax.lax.map(one, jnp.arange(bank.shape[0]))

  def score(chosen, round_):
    k_poison, k_pick, k_fit, k_val = jax.random.split(jax.random.fold_in(key, round_), 4)
    bank = candidates[jnp.asarray(chosen)]
    pick = np.sort(np.asarray(jax.random.choice(k_pick, targets, (count,), replace=False)))
    poisoned = images[train].copy()
    where = np.searchsorted(train, pick)
    for start in range(0, count, batch):
      idx = where[start:start + batch]
      pad = np.concatenate([idx, np.repeat(idx[:1], batch - len(idx))])
      out = blend_jit(jnp.asarray(poisoned[pad], jnp.float32), bank,
                      jax.random.fold_in(k_poison, start))
      poisoned[idx] = np.asarray(jnp.clip(jnp.round(out), 0, 255))[:len(idx)].astype(np.uint8)
    variables = train_model(poisoned, labels[train], k_fit)
    return np.asarray(successes(variables, bank, k_val), np.int64)
  return score


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None,
          fit: Callable | None = None, memo: Callable | None = None) -> Attack:
  """Builds Refool (Liu et al., ECCV 2020) from `config.attack` (fields in the module docstring).

  With `selection_rounds` > 0 this trains `selection_rounds` models (Algorithm 1) before
  it returns, each round printing one line, unless `memo` holds the selection already.

  Args:
    cfg: `config.attack`.
    num_classes: the number of classes, for the selection's model.
    image_shape: (H, W, C) of the images.
    dataset: a `data.Dataset`; needed (its uint8 training images and labels) by the
      'heldout' source and by the selection.
    fit: the engine's trainer (`nad_jax.train.fit`), needed by the selection.
    memo: `memo(name, compute)` (`attacks.build_attack`): keeps the selection (its
      indices and its rounds' scores), so a resumed, rerun or evaluation-only run does not
      select again; None: selects.

  Returns:
    A clean-label Attack whose trigger draws a reflection of its bank per image from
    its PRNG key; with reflections taken from the training set, its `prepare` removes
    them from the victim's training set.

  Raises:
    ValueError: images of at most MAX_RADIUS pixels a side, scikit-image missing for the
      'natural' source, a pattern_path that is not a folder or holds no readable image,
      no dataset where one is needed, no trainer for the selection, more reflections to
      keep than candidates, more held-out or candidate images than the training set has,
      or a surrogate batch larger than the training set (each field's own range is a
      rule of `validation.RULES`).
  """
  ghost_rate = float(field(cfg, 'ghost_rate'))
  strength = tuple(float(s) for s in field(cfg, 'reflection_strength'))
  require(min(image_shape[:2]) > MAX_RADIUS,
          f'refool needs images larger than {MAX_RADIUS} pixels, got {image_shape}')
  seed = int(field(cfg, 'seed'))
  keep = int(field(cfg, 'reflections'))
  rounds = int(field(cfg, 'selection_rounds'))
  count_field = 'attack.reflection_candidates' if rounds else 'attack.reflections'
  count = int(field(cfg, 'reflection_candidates')) if rounds else keep
  path = field(cfg, 'pattern_path')
  heldout = None
  if rounds or (not path and field(cfg, 'reflection_source') == 'heldout'):
    require(dataset is not None, 'attack.selection_rounds / attack.reflection_source '
            "'heldout': refool reads the training set: pass the dataset to build_attack")
  if path:
    require(os.path.isdir(path), f'attack.pattern_path {path!r} is not a directory '
            '(refool reads its reflection images from a folder)')
    candidates = load_folder(path, image_shape)
  elif field(cfg, 'reflection_source') == 'natural':
    candidates = natural_crops(natural_photos(), count, image_shape, seed)
  else:
    heldout = heldout_indices(dataset.train_labels, cfg.target_label, count, seed, count_field)
    candidates = dataset.train_images[heldout].astype(np.float32)
  candidates = to_linear(candidates)
  blend = make_blend(ghost_rate, strength, image_shape)
  bank = candidates
  info = None
  if rounds:
    choose = lambda: _selected(cfg, num_classes, dataset, heldout, candidates, blend, fit,
                               keep, rounds, seed)
    selected = memo('refool_selected', choose) if memo else choose()
    require(isinstance(selected, dict) and {'chosen', 'rounds'} <= selected.keys(),
            "attack.selection_rounds: the workdir's refool_selected.json is not a selection; "
            'delete it to select again')
    bank = candidates[jnp.asarray(selected['chosen'])]
    info = {'selection_rounds': selected['rounds']}

  def trigger(images, key):
    return blend(images, bank, key)

  def prepare(images, labels, poisoned, key):
    del key
    kept = np.ones(len(images), bool)
    kept[heldout] = False
    return images[kept], labels[kept], poisoned[kept]

  return Attack('refool', trigger, relabel=None, clean_label=True,
                prepare=prepare if heldout is not None else None, info=info)


def _selected(cfg, num_classes: int, dataset, heldout: np.ndarray | None,
              candidates: jax.Array, blend: Callable, fit: Callable | None, keep: int,
              rounds: int, seed: int) -> np.ndarray:
  """Runs `select` with `success_scorer` on the training set less `heldout`; build's part.

  Returns:
    {'chosen': the `keep` indices of the selected reflections into `candidates`,
     'rounds': per round, the surrogate's attack success per reflection of R_adv on the
     held-out images, in percent: {'round' (from 1), 'median_asr', 'best_asr'}}.
  """
  require(keep <= candidates.shape[0], f'attack.reflections {keep} exceeds the '
          f'{candidates.shape[0]} candidate reflections')
  images, labels = dataset.train_images, np.asarray(dataset.train_labels)
  if heldout is not None:
    rest = np.setdiff1d(np.arange(len(images)), heldout)
    images, labels = images[rest], labels[rest]
  target = int(cfg.target_label)
  n_holdout = int(field(cfg, 'selection_holdout'))
  non_target = np.flatnonzero(labels != target)
  require(n_holdout < len(non_target), f'attack.selection_holdout {n_holdout} must be below '
          f'the {len(non_target)} non-target training images it is drawn from')
  rng = streams.rng(seed, 'refool_selection')
  holdout = np.sort(rng.choice(non_target, n_holdout, replace=False))
  sur = label_consistent.surrogate_config(cfg, len(images) - n_holdout)
  require(fit is not None, 'attack.selection_rounds: the refool selection trains a model per '
          'round: build the attack with build_attack(..., fit=nad_jax.train.fit)')
  from nad_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(sur.model, num_classes)
  score = success_scorer(model, lambda x, y, k: fit(model, sur, x, y, k), images, labels,
                         holdout, candidates, target, float(cfg.poison_rate), blend,
                         streams.key(seed, 'refool_selection'))

  record = []

  def recorded(chosen, round_):
    s = score(chosen, round_)
    record.append({'round': round_ + 1,
                   'median_asr': round(100.0 * float(np.median(s)) / n_holdout, 2),
                   'best_asr': round(100.0 * float(s.max()) / n_holdout, 2)})
    if jax.process_index() == 0:
      print(f'[refool] selection round {round_ + 1}/{rounds}: {sur.model} ({sur.epochs} '
            f'epochs) on data poisoned by {len(chosen)} reflections; attack success per '
            f'reflection on {n_holdout} held-out images: median {record[-1]["median_asr"]:.2f}%, '
            f'best {record[-1]["best_asr"]:.2f}%', flush=True)
    return s
  chosen = select(candidates.shape[0], keep, rounds, recorded, rng)
  return {'chosen': chosen.tolist(), 'rounds': record}
