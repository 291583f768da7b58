"""Dataset sources (synthetic, tfds, image folder) and on-device augmentation.

A source returns uint8 NHWC arrays on the host; the pipeline moves each split
to the devices once, and everything per step (shuffling, cropping, flipping,
Cutout, triggers) happens there inside jit.
"""

import concurrent.futures
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from nad_jax import streams


class Dataset(NamedTuple):
  """Both splits of a dataset, on the host.

  Attributes:
    train_images: (N, H, W, C) uint8 in [0, 255].
    train_labels: (N,) int32 in [0, num_classes).
    test_images: (N_test, H, W, C) uint8 in [0, 255].
    test_labels: (N_test,) int32 in [0, num_classes).
    num_classes: the number of classes.
  """
  train_images: np.ndarray  # (N, H, W, C) uint8
  train_labels: np.ndarray  # (N,) int32
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


class DataError(ValueError):
  """A data source or path that cannot be read; the message names the config field."""


# ----------------------------------------------------------------------------- sources

def synthetic(seed: int, train_size: int, test_size: int, num_classes: int = 10,
              image_size: int = 32, textures_per_class: int = 1) -> Dataset:
  """A procedural RGB dataset, made in memory from the seed.

  Each class owns a smooth periodic colour texture (a sum of a few random
  low-frequency 2-D sinusoids, symmetric under horizontal flips). An image shows, inside a random box on a dark
  background, its class's texture at a random circular shift, mixed with a
  weaker texture of another class, plus pixel noise. The distractor sometimes
  comes close to the class texture, so even a good network stays below 100%
  clean accuracy; the dark margins make padded random crops look natural.
  With `textures_per_class` > 1 each image draws one of its class's textures.

  Args:
    seed: fixes every draw (the stream streams.rng(seed, 'synthetic_data')).
    train_size: the number of training images.
    test_size: the number of test images.
    num_classes: the number of classes (>= 2: the distractor is another class).
    image_size: the side S of the square images.
    textures_per_class: textures each class draws its images from, >= 1.

  Returns:
    A Dataset of uint8 (N, S, S, 3) images in [0, 255] and int32 (N,) labels.

  Raises:
    DataError: textures_per_class < 1.
  """
  if textures_per_class < 1:
    raise DataError(f'data.textures_per_class must be >= 1, got {textures_per_class}')
  rng = streams.rng(seed, 'synthetic_data')
  grid = np.arange(image_size) / image_size
  textures = np.zeros((num_classes * textures_per_class, image_size, image_size, 3))
  for c in range(len(textures)):
    for _ in range(6):
      fy, fx = rng.integers(0, 4, 2)
      # Even in x, so a horizontal flip is only a shift: flipping keeps the class.
      wave = (np.sin(2 * np.pi * fy * grid[:, None] + rng.uniform(0, 2 * np.pi))
              * np.cos(2 * np.pi * fx * grid[None, :]))
      textures[c] += wave[:, :, None] * rng.normal(size=3)
  textures /= textures.std(axis=(1, 2, 3), keepdims=True)

  def shifted(classes):
    n = len(classes)
    chosen = classes
    if textures_per_class > 1:  # no extra draw otherwise: the default stream stays as it was
      chosen = classes * textures_per_class + rng.integers(0, textures_per_class, n)
    rows = (np.arange(image_size) + rng.integers(0, image_size, (n, 1))) % image_size
    cols = (np.arange(image_size) + rng.integers(0, image_size, (n, 1))) % image_size
    return textures[chosen[:, None, None], rows[:, :, None], cols[:, None, :]]

  def window(n):
    """A random box per image (the 'object'), 18 to 28 pixels a side; dark outside."""
    size = rng.integers(18, 29, (n, 2))
    start = rng.integers(0, image_size - size + 1)
    pixels = np.arange(image_size)
    inside = lambda axis: ((pixels >= start[:, axis:axis + 1])
                           & (pixels < start[:, axis:axis + 1] + size[:, axis:axis + 1]))
    return (inside(0)[:, :, None] & inside(1)[:, None, :])[..., None]

  def make(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    others = (labels + rng.integers(1, num_classes, n)) % num_classes
    weight = rng.uniform(0.4, 1.0, (n, 1, 1, 1))
    images = weight * shifted(labels) + (1 - weight) * shifted(others)
    images += rng.normal(scale=0.8, size=images.shape)
    images = np.where(window(n), 128 + 40 * images, 20 + 10 * rng.normal(size=images.shape))
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels

  return Dataset(*make(train_size), *make(test_size), num_classes)


def tfds_source(name: str, data_dir: str | None) -> Dataset:
  """Loads the train and test splits of a TensorFlow Datasets builder.

  TensorFlow is imported only here (pip install 'nad-jax[tfds]'). A builder that is
  not prepared in `data_dir` is downloaded and prepared first.

  Args:
    name: the tfds builder name (`config.data.name`), e.g. 'cifar10'.
    data_dir: where tfds keeps prepared data (`config.data.data_dir`); None: tfds's
      default, ~/tensorflow_datasets.

  Returns:
    A Dataset of uint8 (N, H, W, C) images and int32 (N,) labels.

  Raises:
    DataError: tfds is not installed, `name` is no tfds builder, or downloading or
      preparing it failed (no network, a moved URL, a full disk); the message names
      data.name and data.data_dir and says what to do.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"data.source 'tfds' needs TensorFlow Datasets ({e}): pip install "
                    "'nad-jax[tfds]', or read an image folder with data.source='folder'") from None
  tf.config.set_visible_devices([], 'GPU')  # keep accelerators for JAX
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'data.name {name!r} is not a TensorFlow Datasets builder '
                    '(tfds.list_builders() lists them)') from None
  try:
    builder.download_and_prepare()
  except ImportError as e:  # a package tfds imports while preparing, not declared by it
    raise DataError(f'data.name {name!r}: tfds needs a package that is not installed ({e}); '
                    "pip install -c constraints.txt 'nad-jax[tfds]' installs what it needs"
                    ) from None
  except Exception as e:  # pylint: disable=broad-except  (network, checksum and I/O errors)
    where = data_dir or '~/tensorflow_datasets (tfds default)'
    reason = (str(e).strip().splitlines() or [''])[0][:300]
    raise DataError(
        f'data.name {name!r}: tfds could not download or prepare it into data.data_dir '
        f'{where} ({type(e).__name__}: {reason}). Point data.data_dir at a folder holding a '
        f'prepared copy (made with `tfds build {name} --data_dir=DIR` on a machine with '
        "network), or read an image folder: data.source='folder', data.path=DIR") from None

  def read(split):
    # Chunks of 10,000 (batch_size=-1 aborts inside TensorFlow 2.21 on some builders).
    chunks = list(tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True).batch(10_000)))
    return (np.concatenate([x for x, _ in chunks]).astype(np.uint8),
            np.concatenate([y for _, y in chunks]).astype(np.int32))

  num_classes = builder.info.features['label'].num_classes
  return Dataset(*read('train'), *read('test'), num_classes)


class FolderScan(NamedTuple):
  """The images of an ImageFolder tree, found by name only (nothing is decoded)."""
  classes: list[str]  # sorted class folder names; label i is classes[i]
  train_files: list[str]  # image paths, class by class, sorted by name within a class
  train_labels: np.ndarray  # (N_train,) int32
  test_files: list[str]
  test_labels: np.ndarray  # (N_test,) int32
  skipped: list[str]  # hidden or non-image entries, relative to the root, sorted


def scan_folder(path: str) -> FolderScan:
  """Lists the images of an ImageFolder tree `path/{train,test}/<class>/<image>`.

  Hidden entries (a name starting with '.') are skipped at every level, and so
  are files without an extension Pillow registers (case-insensitive), folders
  inside class folders, and files beside the class folders.

  Args:
    path: the root folder.

  Returns:
    A FolderScan; classes are the sorted class folder names, numbered from 0.

  Raises:
    DataError: a split is missing, train has no class folders, the test classes
      differ from the training classes, or a class folder holds no image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  extensions = {ext.lower() for ext in Image.registered_extensions()}
  skipped = []

  def entries(directory):
    """Sorted (name, is_dir) of the visible entries; records hidden ones as skipped."""
    visible = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
      if entry.name.startswith('.'):
        skipped.append(os.path.relpath(entry.path, path))
      else:
        visible.append((entry.name, entry.is_dir()))
    return visible

  split_classes = {}
  for split in ('train', 'test'):
    directory = os.path.join(path, split)
    if not os.path.isdir(directory):
      raise DataError(f'data.path {path!r} has no {split!r} folder '
                      '(expected data.path/{train,test}/<class>/<image>)')
    split_classes[split] = []
    for name, is_dir in entries(directory):
      if is_dir:
        split_classes[split].append(name)
      else:
        skipped.append(os.path.join(split, name))
  classes = split_classes['train']
  if not classes:
    raise DataError(f'data.path {path!r}: no class folders in {path}/train')
  missing = sorted(set(classes) - set(split_classes['test']))
  extra = sorted(set(split_classes['test']) - set(classes))
  if missing or extra:
    raise DataError(f'data.path {path!r}: test classes differ from train classes '
                    f'(in train but not in test: {missing}; in test but not in train: {extra})')

  def images(split):
    files, labels = [], []
    for label, name in enumerate(classes):
      directory = os.path.join(path, split, name)
      found = []
      for file, is_dir in entries(directory):
        if not is_dir and os.path.splitext(file)[1].lower() in extensions:
          found.append(os.path.join(directory, file))
        else:
          skipped.append(os.path.join(split, name, file))
      if not found:
        raise DataError(f'data.path {path!r}: class folder {directory} holds no image')
      files += found
      labels += [label] * len(found)
    return files, np.asarray(labels, np.int32)

  train_files, train_labels = images('train')
  test_files, test_labels = images('test')
  return FolderScan(classes, train_files, train_labels, test_files, test_labels, sorted(skipped))


def folder(path: str) -> Dataset:
  """Reads an ImageFolder tree `path/{train,test}/<class>/<image>` with Pillow.

  The tree is listed by `scan_folder`; when it skipped entries, one line names
  how many (and the first few) on stdout.

  Args:
    path: the root folder.

  Returns:
    A Dataset of uint8 (N, H, W, 3) images and int32 (N,) labels.

  Raises:
    DataError: what `scan_folder` raises, an image file Pillow cannot decode,
      or images that differ in size (across both splits).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scan = scan_folder(path)
  if scan.skipped:
    print(f'data.path {path!r}: skipped {len(scan.skipped)} entries that are not images '
          f'or are hidden (e.g. {", ".join(scan.skipped[:3])})', flush=True)

  def read(file):
    try:
      with Image.open(file) as image:
        return np.asarray(image.convert('RGB'))
    # Pillow reports undecodable or truncated files as OSError, SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
      raise DataError(f'data.path {path!r}: cannot read image {file}: {e}') from e

  files = scan.train_files + scan.test_files
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    # A progress bar where stderr is a terminal (tqdm's disable=None).
    images = list(tqdm.tqdm(pool.map(read, files), total=len(files), desc='reading images',
                            unit='img', leave=False, dynamic_ncols=True, disable=None))
  for file, image in zip(files, images):
    if image.shape != images[0].shape:
      raise DataError(f'data.path {path!r}: images differ in size: {file} is '
                      f'{image.shape[0]}x{image.shape[1]} but {files[0]} is '
                      f'{images[0].shape[0]}x{images[0].shape[1]} (height x width)')
  n = len(scan.train_files)
  return Dataset(np.stack(images[:n]), scan.train_labels, np.stack(images[n:]), scan.test_labels,
                 len(scan.classes))


def load_dataset(cfg) -> Dataset:
  """The dataset named by `config.data`.

  Args:
    cfg: `config.data`: source ('synthetic' | 'tfds' | 'folder') and that
      source's fields (synthetic: train_size, test_size, num_classes,
      textures_per_class, seed; tfds: name, data_dir; folder: path).

  Returns:
    A Dataset of uint8 NHWC images in [0, 255] and int32 labels.

  Raises:
    DataError: an unknown source, a folder path that is not a directory, or
      what `tfds_source`, `folder` or `synthetic` raise.
  """
  if cfg.source == 'synthetic':
    return synthetic(cfg.get('seed', 0), cfg.train_size, cfg.test_size, cfg.num_classes,
                     textures_per_class=cfg.get('textures_per_class', 1))
  if cfg.source == 'tfds':
    return tfds_source(cfg.name, cfg.get('data_dir'))
  if cfg.source == 'folder':
    if not cfg.path or not os.path.isdir(cfg.path):
      raise DataError(f'data.path {cfg.path!r} is not a directory')
    return folder(cfg.path)
  raise DataError(f"unknown data.source {cfg.source!r}; choose 'synthetic', 'tfds' or 'folder'")


def clean_subset(num_train: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the clean `fraction` of the training set the defender holds.

  Args:
    num_train: the training set size N.
    fraction: a fraction in (0, 1] (`config.data.clean_fraction`, not a percentage).
    seed: the run's seed; the draw is the stream streams.rng(seed, 'clean_subset').

  Returns:
    max(1, round(fraction * N)) distinct indices in [0, N), sorted, int64.
  """
  rng = streams.rng(seed, 'clean_subset')
  count = max(1, int(round(fraction * num_train)))
  return np.sort(rng.choice(num_train, size=count, replace=False))


# ----------------------------------------------------------------- on-device augmentation

def random_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
  """Per-sample random crop of the zero-padded images back to their size.

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    key: PRNG key.
    padding: zero pixels added on each side; offsets are uniform in [0, 2 * padding].

  Returns:
    (N, H, W, C), same dtype.
  """
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Flips each image left-right with probability 0.5.

  Args:
    images: (N, H, W, C), any dtype.
    key: PRNG key.

  Returns:
    (N, H, W, C), same dtype.
  """
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def cutout(images: jax.Array, key: jax.Array, size: int) -> jax.Array:
  """Zeroes one size x size hole per image, centred anywhere (clipped at the border).

  Cutout (DeVries & Taylor, 2017). The hole spans rows and columns within
  size // 2 of its centre, i.e. 2 * (size // 2) + 1 pixels a side.

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    key: PRNG key of the centres, uniform over the image.
    size: the hole side in pixels.

  Returns:
    (N, H, W, C) float32, 0 inside the hole.
  """
  n, h, w, _ = images.shape
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (n, 1, 1, 1), 0, h)
  cx = jax.random.randint(kx, (n, 1, 1, 1), 0, w)
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  hole = (jnp.abs(rows - cy) <= size // 2) & (jnp.abs(cols - cx) <= size // 2)
  return jnp.where(hole, 0.0, images)


def augment(images: jax.Array, key: jax.Array, crop_flip: bool, cutout_size: int) -> jax.Array:
  """The paper's augmentation: random crop (pad 4) + horizontal flip, optional Cutout.

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    key: PRNG key.
    crop_flip: apply the random crop (zero padding 4) and flip.
    cutout_size: the Cutout hole side in pixels; 0 disables it.

  Returns:
    (N, H, W, C) float32 in [0, 255].
  """
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  if crop_flip:
    images = random_flip(random_crop(images, k_crop, 4), k_flip)
  if cutout_size:
    images = cutout(images, k_cut, cutout_size)
  return images
