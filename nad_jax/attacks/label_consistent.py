"""CL, label-consistent backdoor (Turner, Tsipras & Madry, 2019, "Label-Consistent
Backdoor Attacks", arXiv:1912.02771): a clean-label attack.

Only target-class training images are poisoned and keep their labels. Before the
victim trains, each of them is pushed away from its true class by an L-inf PGD
attack on a surrogate model trained on the clean training set (so that its natural
features become hard to learn and the network leans on the trigger); then the
trigger is stamped into all four corners. Test images get the trigger only.

The trigger: `attack.pattern` (BadNets' 'grid' or 'square', `attack.size`) in each
corner, mirrored left-right in the left corners and up-down in the top ones, so
it survives horizontal flips (Turner et al.'s four-corner pattern). With
`amplitude` a < 255 the patch is blended, x + a/255 * (pattern - x), their
reduced-amplitude trigger.

config.attack fields:
  pattern, size, amplitude          the trigger (defaults 'grid', 3, 255).
  pgd_eps, pgd_step, pgd_steps      L-inf PGD in pixel units on [0, 255]
                                    (defaults 8, 2, 10: eps 8/255, step 2/255).
  surrogate.model, .epochs, .batch_size, .learning_rate, .lr_boundaries, .crop_flip
                                    the clean model the perturbation is computed
                                    against: trained from scratch on all training
                                    images (clean labels) with the project's
                                    TrainEpoch (SGD, Nesterov momentum 0.9, wd 5e-4).
  clean_label                       None/True (default); False relabels as well.
The perturbation runs once, in `prepare`, on the devices (training: one jitted
epoch at a time; PGD: one jitted call per batch); the result is rounded to uint8.
"""

import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nad_jax.attacks import badnets
from nad_jax.attacks.core import DEFAULTS, Attack, field, require

if TYPE_CHECKING:  # annotations only
  import flax.linen as nn


def corner_stamps(values: np.ndarray, image_shape: tuple[int, int, int]
                  ) -> list[tuple[np.ndarray, int, int]]:
  """The pattern (and its mirror images) with each corner's origin.

  Args:
    values: (s, s) patch values in [0, 255] (from `badnets.patch`).
    image_shape: (H, W, C) of the images.

  Returns:
    One (values, row, col) per corner of `badnets.CORNERS`: the patch mirrored
    left-right in the left corners and up-down in the top ones, and its top-left pixel.

  Raises:
    ValueError: the patch is larger than the image.
  """
  stamps = []
  for corner in badnets.CORNERS:
    v = values
    if corner.endswith('left'):
      v = v[:, ::-1]
    if corner.startswith('top'):
      v = v[::-1, :]
    stamps.append((np.ascontiguousarray(v), *badnets.corner_origin(corner, len(values),
                                                                   *image_shape[:2])))
  return stamps


def make_trigger(pattern: str, size: int, amplitude: float, image_shape: tuple[int, int, int]
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Turner et al. 2019's four-corner trigger, at reduced amplitude when `amplitude` < 255.

  Args:
    pattern: 'grid' or 'square' (`badnets.patch`).
    size: the patch side in pixels.
    amplitude: in (0, 255]; each patch pixel becomes x + amplitude/255 * (v - x).
    image_shape: (H, W, C) of the images.

  Returns:
    trigger(images, key) -> images: (N, H, W, C) float32 in [0, 255] in and out;
    the PRNG key is ignored.

  Raises:
    ValueError: as `badnets.patch` and `badnets.corner_origin`.
  """
  values = badnets.patch(pattern, size)
  stamps = corner_stamps(values, image_shape)
  ratio = amplitude / 255.0

  def trigger(images, key):
    del key  # fixed patches
    for v, row, col in stamps:
      h, w = v.shape
      region = images[:, row:row + h, col:col + w, :]
      new = region + ratio * (jnp.asarray(v)[None, :, :, None] - region)
      images = images.at[:, row:row + h, col:col + w, :].set(new)
    return images
  return trigger


def pgd(model: 'nn.Module', variables: dict, normalize: Callable[[jax.Array], jax.Array],
        images: jax.Array, labels: jax.Array, eps: float, step: float, steps: int
        ) -> jax.Array:
  """Untargeted L-inf PGD on pixels in [0, 255]: maximise the CE of the true labels.

  Madry et al.'s PGD as Turner et al. 2019 use it; it starts at the images (no
  random start) and takes signed-gradient steps, projected to the eps-ball and [0, 255].

  Args:
    model: the surrogate Flax module.
    variables: its {'params', 'batch_stats'}.
    normalize: float pixels in [0, 255] -> the model's input (`train.normalizer`).
    images: (N, H, W, C) float32 in [0, 255].
    labels: (N,) int32 true labels.
    eps: the L-inf radius in pixel units (8 = 8/255).
    step: the step size in pixel units.
    steps: the number of steps.

  Returns:
    (N, H, W, C) float32 adversarial images in [0, 255], not rounded.
  """
  def loss(x):
    logits = model.apply(variables, normalize(x), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  def body(_, x):
    x = x + step * jnp.sign(jax.grad(loss)(x))
    return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 255.0)
  return jax.lax.fori_loop(0, steps, body, images)


def train_surrogate(sur: types.SimpleNamespace, num_classes: int, images: np.ndarray,
                    labels: np.ndarray, key: jax.Array, fit: Callable | None
                    ) -> tuple['nn.Module', dict]:
  """Trains the clean surrogate with the trainer handed in; returns (model, variables).

  Args:
    sur: the settings from `surrogate_config`.
    num_classes: the number of classes.
    images: (N, H, W, C) uint8 training images in [0, 255].
    labels: (N,) int32 clean labels.
    key: PRNG key for initialisation and the epochs' shuffling and augmentation.
    fit: `nad_jax.train.fit` or a function like it: (model, settings, images, labels,
      key) -> variables, training from scratch on pixels / 255 with cross-entropy.
      The attacks sit below the engine, so the engine is handed in, not imported.

  Returns:
    (model, variables): the Flax module and its trained {'params', 'batch_stats'}.

  Raises:
    ValueError: no trainer was handed in.
  """
  from nad_jax import models  # pylint: disable=g-import-not-at-top
  if fit is None:
    raise ValueError('the cl attack trains a surrogate: build it with '
                     'build_attack(..., fit=nad_jax.train.fit)')
  model = models.build_model(sur.model, num_classes)
  return model, fit(model, sur, images, labels, key)


def surrogate_config(cfg, num_images: int) -> types.SimpleNamespace:
  """The surrogate's training settings from `config.attack.surrogate`.

  Each field's range and type is a rule of `validation.RULES`; only the batch size
  against the training set is checked here.

  Args:
    cfg: `config.attack`; its `surrogate` holds model ('tiny'), epochs (10),
      batch_size (128), learning_rate (0.05), lr_boundaries (()), crop_flip (True).
    num_images: the training set size, to check batch_size against; 0 skips that check.

  Returns:
    A namespace with those fields plus the fixed optimiser settings `make_optimizer`
    reads (lr_decay 0.1, momentum 0.9, nesterov True, weight_decay 5e-4).

  Raises:
    ValueError: a batch size that exceeds `num_images`.
  """
  sur = field(cfg, 'surrogate')
  get = lambda name: field(sur, name, DEFAULTS['surrogate'])
  out = types.SimpleNamespace(
      model=get('model'), epochs=int(get('epochs')), batch_size=int(get('batch_size')),
      learning_rate=float(get('learning_rate')), lr_boundaries=tuple(get('lr_boundaries')),
      lr_decay=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
      crop_flip=bool(get('crop_flip')))
  if num_images:
    require(out.batch_size <= num_images, f'attack.surrogate.batch_size {out.batch_size} exceeds '
            f'the {num_images} training images')
  return out


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None,
          fit: Callable | None = None) -> Attack:
  """Builds CL (Turner et al. 2019) from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`.
    num_classes: the number of classes, for the surrogate.
    image_shape: (H, W, C) of the images.
    dataset: a `data.Dataset` or None; only its training set size is used, to
      validate the surrogate's batch size early.
    fit: the trainer of the surrogate (`nad_jax.train.fit`), needed by `prepare`.

  Returns:
    A clean-label Attack whose `prepare` trains the surrogate and replaces the
    poisoned images by their PGD perturbations, rounded to uint8.

  Raises:
    ValueError: a grid pattern of size other than 3, a patch larger than the images,
      or a surrogate batch size larger than the training set (each field's own range
      is a rule of `validation.RULES`).
  """
  amplitude = float(field(cfg, 'amplitude'))
  trigger = make_trigger(field(cfg, 'pattern'), int(field(cfg, 'size')), amplitude,
                         image_shape)
  eps, step = float(field(cfg, 'pgd_eps')), float(field(cfg, 'pgd_step'))
  steps = int(field(cfg, 'pgd_steps'))
  surrogate_config(cfg, 0 if dataset is None else len(dataset.train_images))  # fail early

  def prepare(images, labels, poisoned, key):
    chosen = np.flatnonzero(poisoned)
    if not len(chosen) or eps == 0 or steps == 0:
      return images, labels, poisoned
    sur = surrogate_config(cfg, len(images))
    model, variables = train_surrogate(sur, num_classes, images, labels, key, fit)
    normalize = lambda x: x / 255.0  # the surrogate's input scaling (train.fit's)
    attack = jax.jit(lambda v, x, y: pgd(model, v, normalize, x, y, eps, step, steps))
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, normalize(x), train=False), -1))
    batch = 256
    out = images.copy()
    fooled = clean_right = 0
    for start in range(0, len(chosen), batch):
      idx = chosen[start:start + batch]
      pad = np.concatenate([idx, np.repeat(idx[:1], batch - len(idx))])
      x = jnp.asarray(images[pad], jnp.float32)
      y = jnp.asarray(labels[pad])
      adv = np.asarray(jnp.clip(jnp.round(attack(variables, x, y)), 0, 255))[:len(idx)]
      out[idx] = adv.astype(np.uint8)
      clean_right += int(np.sum(np.asarray(predict(variables, x))[:len(idx)] == labels[idx]))
      fooled += int(np.sum(np.asarray(predict(variables, jnp.asarray(adv, jnp.float32)))
                           != labels[idx]))
    if jax.process_index() == 0:
      print(f'[cl] surrogate {sur.model} ({sur.epochs} epochs): {clean_right}/{len(chosen)} '
            f'poisoned images classified right before PGD, {fooled} misclassified after '
            f'(eps {eps:g}, {steps} steps)', flush=True)
    return out, labels, poisoned

  return Attack('cl', trigger, relabel=None, clean_label=True, prepare=prepare)
