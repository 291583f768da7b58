"""Poisoned test images from files: measure a backdoor whose trigger nad-jax does not implement.

The attack has no trigger function: it only supplies poisoned test images with
their backdoor and true labels, on which the evaluation measures asr (share
classified as the backdoor label) and ra (share classified as the true label),
instead of triggering the clean test set. It cannot poison a training set, so a
run with it must load the backdoored model (`student.checkpoint`); acc and
acc_nontarget are measured on the clean test set as for every attack, the
non-target images being those whose label `attack.mode` / `attack.target_label`
changes.

Fields of `config.attack`:
  path: one of
    - a BackdoorBench record: its folder (record/<name>) or its attack_result.pt;
      the record's bd_test is read (nad_jax.backdoorbench);
    - an .npz file with `images` (N, H, W, C) or (N, H, W) uint8, `labels` (N,)
      backdoor labels and `original_labels` (N,) true labels;
    - a folder PATH/<true label>/<image>: one subfolder per class, named by its
      integer index (0, 1, ..., as a BackdoorBench record's bd_test_dataset/),
      holding PNG, JPEG, BMP or WebP images (hidden entries are skipped); the
      backdoor labels are `attack.mode` / `attack.target_label`'s map of the
      true labels.
  target_label, mode: the backdoor's label map; the backdoor labels of an .npz
    or record must agree with it.
Images must have the dataset's size (H, W); .npz images also its channels; image
files are converted to its channels. Images whose backdoor label equals their
true label measure nothing and are dropped.
"""

import os

import numpy as np

from nad_jax import backdoorbench
from nad_jax.attacks.core import Attack, PoisonedTest, field, relabel_fn, require


def _from_npz(path: str, image_shape) -> PoisonedTest:
  names = ('images', 'labels', 'original_labels')
  try:
    with np.load(path, allow_pickle=False) as arrays:
      arrays = {k: arrays[k] for k in arrays.files if k in names}
  except Exception as e:  # pylint: disable=broad-except  (zip, format and pickle refusals)
    raise ValueError(f'attack.path {path!r} cannot be read as .npz: {e}') from None
  missing = [k for k in names if k not in arrays]
  require(not missing, f'attack.path {path!r} lacks arrays {missing}; expected images, '
                       'labels (backdoor labels) and original_labels')
  images, labels, originals = (arrays[k] for k in names)
  if images.ndim == 3:
    images = images[..., None]
  require(images.dtype == np.uint8 and images.shape[1:] == tuple(image_shape),
          f'attack.path {path!r}: images are {images.dtype} {images.shape}; expected uint8 '
          f'(N, {", ".join(map(str, image_shape))})')
  require(labels.shape == originals.shape == (len(images),),
          f'attack.path {path!r}: labels {labels.shape} and original_labels {originals.shape} '
          f'must both be ({len(images)},)')
  return PoisonedTest(images, labels.astype(np.int32), originals.astype(np.int32))


def _from_folder(path: str, image_shape, relabel) -> PoisonedTest:
  classes = sorted((e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')),
                   key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
  require(classes and all(name.isdigit() for name in classes),
          f'attack.path {path!r}: expected subfolders named by integer class index '
          f'(PATH/<label>/<image>), found {classes[:5]}')
  files = [(os.path.join(path, c, f), int(c)) for c in classes
           for f in sorted(os.listdir(os.path.join(path, c)))
           if not f.startswith('.') and f.lower().endswith(backdoorbench.IMAGE_EXTENSIONS)]
  require(bool(files), f'attack.path {path!r} holds no images '
                       f'({", ".join(backdoorbench.IMAGE_EXTENSIONS)})')
  images = np.stack([backdoorbench.read_image(f, image_shape) for f, _ in files])
  originals = np.asarray([label for _, label in files], np.int32)
  return PoisonedTest(images, np.asarray(relabel(originals), np.int32), originals)


def _from_record(path: str, image_shape) -> PoisonedTest:
  test = backdoorbench.read_bd_test(path)
  require(test.images.shape[1:] == tuple(image_shape),
          f'attack.path {path!r}: the record\'s images are {test.images.shape[1:]}; the '
          f'dataset\'s are {tuple(image_shape)}')
  return PoisonedTest(test.images, test.labels, test.original_labels)


def read(path: str, image_shape, relabel) -> PoisonedTest:
  """The poisoned test images at `path` (a record, an .npz or a folder; see the module).

  Args:
    path: `attack.path`.
    image_shape: (H, W, C) of the dataset's images.
    relabel: the backdoor's label map (`relabel_fn`), for a folder's backdoor labels.

  Returns:
    The PoisonedTest, every image included.

  Raises:
    ValueError: `path` is missing or unreadable, or its images or labels do not
      fit; the message names attack.path.
  """
  require(bool(path) and os.path.exists(path),
          f"attack.path {path!r} does not exist (the 'files' attack needs a BackdoorBench "
          'record, an .npz or a folder of poisoned test images)')
  try:
    if os.path.isfile(os.path.join(path, backdoorbench.RESULT_FILE)) or path.endswith('.pt'):
      return _from_record(path, image_shape)
    if os.path.isdir(path):
      return _from_folder(path, image_shape, relabel)
    return _from_npz(path, image_shape)
  except backdoorbench.RecordError as e:
    raise ValueError(f'attack.path: {e}') from None


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """The 'files' attack: poisoned test images from `cfg.path`, no trigger.

  Args:
    cfg: `config.attack` with path, target_label and mode (the module's fields).
    num_classes: the number of classes.
    image_shape: (H, W, C) of the dataset's images.
    dataset: unused (the registry's common signature).

  Returns:
    An Attack with trigger None and `test_set` the poisoned images whose backdoor
    label differs from their true label: images (N, H, W, C) uint8, labels and
    original_labels (N,) int32.

  Raises:
    ValueError: as `read`; labels outside [0, num_classes); backdoor labels that
      disagree with attack.mode / attack.target_label; no image whose backdoor
      label differs from its true label.
  """
  del dataset
  path = field(cfg, 'path')
  mode = field(cfg, 'mode')
  relabel = relabel_fn(mode, cfg.target_label, num_classes)
  test = read(path, image_shape, relabel)
  for name, labels in (('labels', test.labels), ('original_labels', test.original_labels)):
    require(labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes),
            f'attack.path {path!r}: {name} outside [0, {num_classes})')
  changed = test.labels != test.original_labels
  expected = np.asarray(relabel(test.original_labels))
  disagree = np.flatnonzero(changed & (test.labels != expected))
  require(disagree.size == 0,
          f'attack.path {path!r}: backdoor labels disagree with attack.mode {mode!r} / '
          f'attack.target_label {cfg.target_label} ({disagree.size} images; first: true '
          f'label {test.original_labels[disagree[:1]].tolist()} -> '
          f'{test.labels[disagree[:1]].tolist()}, expected {expected[disagree[:1]].tolist()})')
  require(bool(changed.any()), f'attack.path {path!r} holds no image whose backdoor label '
                               'differs from its true label')
  return Attack('files', None, relabel,
                test_set=PoisonedTest(test.images[changed], test.labels[changed],
                                      test.original_labels[changed]))
