"""What every attack provides, and the choice of poisoned training samples."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PoisonedTest(NamedTuple):
  """Poisoned test images given as files, with their labels (the 'files' attack).

  Attributes:
    images: (N, H, W, C) uint8 triggered test images in [0, 255].
    labels: (N,) int32 backdoor labels (what the backdoor makes the model say).
    original_labels: (N,) int32 true labels of the images.
  """
  images: np.ndarray
  labels: np.ndarray
  original_labels: np.ndarray


class Attack(NamedTuple):
  """A backdoor attack, as pure functions applied on the device inside jit.

  trigger: (images float32 NHWC in [0, 255], PRNG key) -> triggered images. The
    same function triggers the poisoned training samples and the test images.
    None for an attack whose poisoned test images are given (`test_set`): it
    cannot poison a training set.
  relabel: true labels -> the labels the backdoor should produce.
  clean_label: poison only samples whose label already is the target, keep labels.
  prepare: optional, called once on the host before the backdoored stage:
    (train images uint8 NHWC, labels, poisoned mask, PRNG key) -> the same three,
    changed (e.g. CL's adversarial perturbation of the poisoned images, Refool's
    removal of its held-out reflection images, WaNet's noise-mode images). It may
    run jitted work on the devices; its output depends only on its inputs and key.
  test_set: the poisoned test images to evaluate the attack on, or None: the
    evaluation triggers the clean test images whose backdoor label differs from
    their label.
  info: what building the attack measured that a results file reports (Refool's
    selection rounds), JSON-serialisable; None: nothing.
  """
  name: str
  trigger: Callable[[jax.Array, jax.Array], jax.Array] | None
  relabel: Callable[[jax.Array], jax.Array]
  clean_label: bool = False
  prepare: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
  test_set: PoisonedTest | None = None
  info: dict | None = None


def relabel_fn(mode: str, target_label: int,
               num_classes: int) -> Callable[[jax.Array], jax.Array]:
  """The backdoor's label map for `config.attack.mode`.

  Args:
    mode: 'all_to_one' (every label -> `target_label`) or 'all_to_all'
      (label y -> (y + 1) mod `num_classes`; Gu et al. 2017's all-to-all BadNets).
    target_label: the target class, in [0, num_classes); used by 'all_to_one'.
    num_classes: the number of classes; used by 'all_to_all'.

  Returns:
    labels -> backdoor labels, elementwise: integer labels (N,) (numpy or jax;
    int32 in this project) in, the same shape and dtype out. Pure and jittable.
    `mode` is checked by `validation.RULES` (attack.mode) before any attack is built.
  """
  if mode == 'all_to_all':
    return lambda labels: (labels + 1) % num_classes
  return lambda labels: jnp.full_like(labels, target_label)


def poison_mask(labels: np.ndarray, attack: Attack, poison_rate: float,
                rng: np.random.Generator) -> np.ndarray:
  """Boolean mask of the training samples to poison, fixed by `rng`.

  Dirty-label attacks poison `poison_rate` of the whole training set, drawn from
  every class (as the official NAD code does); clean-label attacks poison
  `poison_rate` of the samples whose label is already the backdoor's target.

  Args:
    labels: (N,) integer training labels.
    attack: the attack; its `relabel` and `clean_label` are used.
    poison_rate: a fraction in [0, 1] (not a percentage) of the candidates;
      round(poison_rate * candidates) samples are drawn without replacement.
    rng: the generator that draws them.

  Returns:
    (N,) bool mask, True for the poisoned samples.
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


def prepare(attack: Attack, images: np.ndarray, labels: np.ndarray, poisoned: np.ndarray,
            key: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The training set the victim trains on: `attack.prepare`'s output, or the input as is.

  Args:
    attack: the attack.
    images: (N, H, W, C) uint8 training images in [0, 255].
    labels: (N,) int32 labels.
    poisoned: (N,) bool mask from `poison_mask`.
    key: the PRNG key `attack.prepare` draws from (the run's
      streams.key(seed, 'attack_prepare')).

  Returns:
    (images, labels, poisoned) in the same formats; N may change (Refool drops
    its held-out reflection images).
  """
  if attack.prepare is None:
    return images, labels, poisoned
  return attack.prepare(images, labels, poisoned, key)


# ------------------------------------------------------- shared helpers for the attack modules

# Every field of `config.attack` and its default, written once: nad_jax.defaults builds the
# config's attack section from it and `field` falls back to it. Each attack module's docstring
# documents the fields it reads.
DEFAULTS = {
    'name': 'badnets', 'target_label': 5, 'poison_rate': 0.1, 'mode': 'all_to_one',
    'pattern': 'grid', 'size': 3, 'corner': 'bottom_right',  # badnets, cl; trojan: size
    'seed': 0,  # the attack's own draws: noise pattern, warp field, reflection images
    'clean_label': None,  # None: the attack's default
    'pattern_path': '',  # trojan/blend/sig: a trigger file; refool: a folder of reflections
    'path': '',  # files: poisoned test images (.npz, image folder or BackdoorBench record)
    'alpha': 0.2,  # blend; sig with sig_mode 'blend'
    'delta': 20.0, 'frequency': 6.0, 'sig_mode': 'add',  # sig
    'amplitude': 255.0, 'pgd_eps': 8.0, 'pgd_step': 2.0, 'pgd_steps': 10,  # cl (pixel units)
    # cl: the clean model PGD attacks; trojan: the random model a patch is generated for;
    # refool: the model each round of its reflection selection trains.
    'surrogate': {'model': 'tiny', 'epochs': 10, 'batch_size': 128, 'learning_rate': 0.05,
                  'lr_boundaries': (), 'crop_flip': True},
    'trojan_neurons': 1, 'trojan_steps': 200,  # trojan without pattern_path
    # refool: the bank (`reflections` kept of `reflection_candidates` by `selection_rounds`
    # of the paper's selection, scored on `selection_holdout` images) and the blend
    'reflection_source': 'natural', 'reflections': 200, 'reflection_candidates': 2000,
    'selection_rounds': 16, 'selection_holdout': 1000,
    'ghost_rate': 0.69, 'reflection_strength': (0.05, 0.45),
    'warp_k': 4, 'warp_strength': 0.5, 'cross_ratio': 2.0,  # wanet
}

# The fields of DEFAULTS that one attack alone reads: a model poisoned by another attack does
# not depend on them (a workdir's record leaves them out, validation.stage_fields).
OWN_FIELDS = {
    'refool': ('reflection_source', 'reflections', 'reflection_candidates', 'selection_rounds',
               'selection_holdout', 'ghost_rate', 'reflection_strength'),
    'trojan': ('trojan_neurons', 'trojan_steps'),
    'wanet': ('warp_k', 'warp_strength', 'cross_ratio'),
}


def field(cfg, name: str, defaults: dict = DEFAULTS) -> Any:
  """`cfg.name`, or its default where the config has no such field (or it is None).

  Args:
    cfg: a ConfigDict or dict (read with `.get`), or any object (`getattr`).
    name: the field name.
    defaults: where the default is read: DEFAULTS, or DEFAULTS['surrogate'] for the
      fields of `attack.surrogate`.

  Returns:
    The field's value, or `defaults[name]`.
  """
  value = cfg.get(name) if hasattr(cfg, 'get') else getattr(cfg, name, None)
  return defaults[name] if value is None else value


def require(ok: bool, message: str) -> None:
  """Validates a config field.

  Args:
    ok: the condition that must hold.
    message: the error message; it should name the `attack.` field.

  Raises:
    ValueError: `ok` is false.
  """
  if not ok:
    raise ValueError(message)


def load_pattern(path: str, image_shape: tuple[int, int, int],
                 field_name: str = 'attack.pattern_path') -> np.ndarray:
  """A pattern file as an (H, W, C or 1) array, raw values (dtype kept for .npy/.npz).

  .npz (key 'x', or its only array) and .npy arrays may be HW, HWC or CHW and must
  match the image size; any other file is read as an image by Pillow and resized
  (bilinear) to the image size, giving float32 values in [0, 255].

  Args:
    path: the file.
    image_shape: (H, W, C) of the images the pattern must fit.
    field_name: the config field named in error messages.

  Returns:
    (H, W, 1) or (H, W, C) array; values are not range-checked here.

  Raises:
    ValueError: `path` is not a file, cannot be read, holds no single array
      (.npz without key 'x' and with several arrays), or has another size.
  """
  import os  # pylint: disable=g-import-not-at-top
  height, width, channels = image_shape
  require(bool(path) and os.path.isfile(path), f'{field_name} {path!r} is not a file')
  try:
    if path.endswith(('.npy', '.npz')):
      loaded = np.load(path)
      if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        require('x' in keys or len(keys) == 1,
                f"{field_name} {path!r}: expected an array under key 'x', found {keys}")
        loaded = loaded['x' if 'x' in keys else keys[0]]
      array = np.asarray(loaded)
    else:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(path) as image:
        image = image.convert('L' if channels == 1 else 'RGB')
        array = np.asarray(image.resize((width, height), Image.BILINEAR), np.float32)
  except ValueError:
    raise
  except Exception as e:  # unreadable file: one clear message
    raise ValueError(f'{field_name} {path!r} cannot be read: {e}') from None
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim == 3 and array.shape[:2] != (height, width) and array.shape[1:] == (height, width):
    array = np.transpose(array, (1, 2, 0))  # CHW -> HWC
  require(array.ndim == 3 and array.shape[:2] == (height, width)
          and array.shape[2] in (1, channels),
          f'{field_name} {path!r} has shape {array.shape}; expected ({height}, {width}) '
          f'with 1 or {channels} channels (HW, HWC or CHW)')
  return array
