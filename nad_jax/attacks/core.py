"""What every attack provides, and the choice of poisoned training samples."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


class Attack(NamedTuple):
  """A backdoor attack, as pure functions applied on the device inside jit.

  trigger: (images float32 NHWC in [0, 255], PRNG key) -> triggered images. The
    same function triggers the poisoned training samples and the test images.
  relabel: true labels -> the labels the backdoor should produce.
  clean_label: poison only samples whose label already is the target, keep labels.
  prepare: optional, called once on the host before the backdoored stage:
    (train images uint8 NHWC, labels, poisoned mask, PRNG key) -> the same three,
    changed (e.g. CL's adversarial perturbation of the poisoned images, Refool's
    removal of its held-out reflection images, WaNet's noise-mode images). It may
    run jitted work on the devices; its output depends only on its inputs and key.
  """
  name: str
  trigger: Callable[[jax.Array, jax.Array], jax.Array]
  relabel: Callable[[jax.Array], jax.Array]
  clean_label: bool = False
  prepare: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None


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
            seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The training set the victim trains on: `attack.prepare`'s output, or the input as is.

  Args:
    attack: the attack.
    images: (N, H, W, C) uint8 training images in [0, 255].
    labels: (N,) int32 labels.
    poisoned: (N,) bool mask from `poison_mask`.
    seed: the run's seed; `attack.prepare` gets the PRNG key
      fold_in(key(seed), 1000).

  Returns:
    (images, labels, poisoned) in the same formats; N may change (Refool drops
    its held-out reflection images).
  """
  if attack.prepare is None:
    return images, labels, poisoned
  key = jax.random.fold_in(jax.random.key(seed), 1000)
  return attack.prepare(images, labels, poisoned, key)


# ------------------------------------------------------- shared helpers for the attack modules

def field(cfg, name: str, default: Any) -> Any:
  """`cfg.name`, or `default` where the config has no such field (or it is None).

  Args:
    cfg: a ConfigDict or dict (read with `.get`), or any object (`getattr`).
    name: the field name.
    default: returned where the field is absent or None.

  Returns:
    The field's value, or `default`.
  """
  value = cfg.get(name, default) if hasattr(cfg, 'get') else getattr(cfg, name, default)
  return default if value is None else value


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
