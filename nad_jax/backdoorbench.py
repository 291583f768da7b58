"""BackdoorBench records: a backdoored model and its poisoned test set in, a cleaned model out.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks) saves each attack
as `record/<name>/attack_result.pt`, a torch.save'd dict:
  model_name   'preactresnet18', 'vgg19_bn', 'resnet18', ... (nad-jax: MODELS below)
  num_classes  int
  model        the backdoored model's state_dict (possibly with DataParallel's 'module.')
  img_size     (H, W, C)
  clean_data   'cifar10', 'cifar100', 'gtsrb', 'tiny', ... (its input normalisation)
  data_path    where BackdoorBench read the clean data (not used here)
  bd_train     the poisoned training set's state (not used here)
  bd_test      the poisoned test set (only the images whose backdoor label differs
               from their label: for all-to-one attacks, the non-target ones)
bd_test comes in two layouts:
  main and v2 branches: {'bd_data_container': {'data_dict': {index: {'path': PNG,
    'other_info': [backdoor label, original label]}}, ...}, 'original_index_array',
    'poison_indicator', ...}; the PNGs lie in record/<name>/bd_test_dataset/<original
    label>/<index>.png, stored relative to BackdoorBench's working folder (main) or
    absolute (v2): both are read from the record folder, so a moved record works.
  v1 branch: {'x': images (PIL images or arrays), 'y': backdoor labels,
    'original_index': test indices, 'original_targets': original labels}.
A defense writes record/<name>/defense/<defense>/defense_result.pt ({'model_name',
'num_classes', 'model'}) and a per-epoch `<defense>_df.csv` (`write_defense_result`).

Files are read with torch.load(weights_only=True); beyond tensors and plain Python
values, only the numpy array, scalar and dtype reconstructors of ALLOWED_GLOBALS and
PIL's Image (v1's images; it rebuilds pixels from raw bytes) may be unpickled.
torch is imported only when a file is read or written (pip install 'nad-jax[torch]').
"""

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nad_jax import models, torch_io
from nad_jax.checkpoint import CheckpointError

# BackdoorBench's model_name -> nad-jax's registry name (the same PyTorch layouts, torch_io).
MODELS = {'preactresnet18': 'preact_resnet18', 'resnet18': 'resnet18', 'vgg19_bn': 'vgg19_bn'}
# BackdoorBench's clean_data -> its input normalisation (mean, std) on the [0, 1] scale
# (its get_dataset_normalization); None: pixels / 255 only.
NORMALIZATION = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'tiny': ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    'mnist': ((0.5,), (0.5,)),
    'gtsrb': None,
    'celeba': None,
}
RESULT_FILE = 'attack_result.pt'
REQUIRED = ('model_name', 'num_classes', 'model', 'img_size', 'clean_data', 'bd_test')
# The columns of BackdoorBench's per-epoch defense CSV that nad-jax fills (accuracies
# as fractions in [0, 1], as BackdoorBench writes them), and the history key of each.
CSV_COLUMNS = {'epoch': 'epoch', 'test_acc': 'acc', 'test_asr': 'asr', 'test_ra': 'ra'}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class RecordError(CheckpointError):
  """A BackdoorBench record that cannot be read or written; the message names the file."""


class BackdoorTest(NamedTuple):
  """A record's poisoned test set.

  Attributes:
    images: (N, H, W, C) uint8 triggered test images in [0, 255].
    labels: (N,) int32 backdoor labels.
    original_labels: (N,) int32 true labels.
    index: (N,) int64 each image's index in the clean test split.
  """
  images: np.ndarray
  labels: np.ndarray
  original_labels: np.ndarray
  index: np.ndarray


@dataclasses.dataclass(frozen=True)
class Record:
  """A BackdoorBench attack record, read into nad-jax's terms.

  Attributes:
    path: the record folder (record/<name>).
    model_name: nad-jax's registry name of the model (`models.MODELS`).
    num_classes: the number of classes.
    image_shape: (H, W, C) of the model's inputs.
    dataset: BackdoorBench's clean_data name ('cifar10', 'gtsrb', ...).
    mean: per-channel input mean on the [0, 1] scale, or None (see `train.normalizer`).
    std: per-channel input standard deviation, or None.
    variables: the backdoored model's {'params', 'batch_stats'} (numpy, float32).
    bd_test: the poisoned test set.
  """
  path: str
  model_name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  dataset: str
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  variables: dict
  bd_test: BackdoorTest


def allowed_globals() -> list[Any]:
  """What torch.load may unpickle from a record beyond tensors and plain values.

  numpy's array, scalar and dtype reconstructors (under numpy 1's `numpy.core` and
  numpy 2's `numpy._core` names, as records hold one or the other) and PIL's Image.

  Returns:
    The list `torch_io.read_file` takes as `allowed`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scalar = np.int64(0).__reduce__()[0]
  reconstruct = np.zeros(1).__reduce__()[0]
  named = [(function, f'{module}.{function.__name__}') for function in (scalar, reconstruct)
           for module in ('numpy.core.multiarray', 'numpy._core.multiarray')]
  dtypes = [type(np.dtype(code)) for code in '?bhilqBHILQefd']
  return [np.ndarray, np.dtype, *dtypes, *named, Image.Image]


def result_file(path: str) -> str:
  """The attack_result.pt of a record given as its folder or as the file itself."""
  return os.path.join(path, RESULT_FILE) if os.path.isdir(path) else path


def load_result(path: str) -> dict:
  """The content of a record's attack_result.pt, read safely.

  Args:
    path: the record folder (record/<name>) or its attack_result.pt.

  Returns:
    The saved dict, with at least the keys of REQUIRED.

  Raises:
    RecordError: the file is missing, unreadable without unsafe unpickling, or
      lacks a key of REQUIRED.
  """
  file = result_file(path)
  try:
    content = torch_io.read_file(file, allowed_globals(), 'a BackdoorBench record')
  except CheckpointError as e:
    raise RecordError(str(e)) from None
  missing = [key for key in REQUIRED if not isinstance(content, dict) or key not in content]
  if missing:
    raise RecordError(f'{file} is not a BackdoorBench attack result: it lacks {missing}')
  return content


def read_image(path: str, image_shape: Sequence[int]) -> np.ndarray:
  """One image file as uint8 (H, W, C), resized (bilinear) where its size differs.

  Args:
    path: an image file Pillow reads (PNG, JPEG, ...).
    image_shape: (H, W, C) wanted; C is 1 (grey) or 3 (RGB).

  Returns:
    (H, W, C) uint8.

  Raises:
    RecordError: the file is missing or not an image.
  """
  return _to_array(_open(path), image_shape, path)


def _open(path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.load()
      return image
  except FileNotFoundError:
    raise RecordError(f'{path} does not exist') from None
  except Exception as e:  # pylint: disable=broad-except  (Pillow's many decoding errors)
    raise RecordError(f'{path} is not a readable image ({type(e).__name__}: {e})') from None


def _to_array(image: Any, image_shape: Sequence[int], source: str) -> np.ndarray:
  """A PIL image or an HWC/HW array -> uint8 (H, W, C) of `image_shape`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width, channels = image_shape
  if not isinstance(image, Image.Image):
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3):
      raise RecordError(f'{source}: an image of shape {array.shape}; expected (H, W) or (H, W, C)')
    image = Image.fromarray(array.astype(np.uint8))
  image = image.convert('L' if channels == 1 else 'RGB')
  if image.size != (width, height):
    image = image.resize((width, height), Image.BILINEAR)
  return np.asarray(image, np.uint8).reshape(height, width, channels)


def _stored_image(stored: str, folder: str) -> str:
  """A bd_test PNG path as stored (relative to BackdoorBench's working folder, or
  absolute) -> the file in `folder`: its last three parts, bd_test_dataset/<label>/<i>.png."""
  parts = [p for p in str(stored).replace('\\', '/').split('/') if p]
  return os.path.join(folder, *parts[-3:])


def _container_test(bd: dict, folder: str, file: str, image_shape) -> BackdoorTest:
  """bd_test of the main and v2 branches: PNG files listed in bd_data_container."""
  entries = bd['bd_data_container'].get('data_dict') if isinstance(
      bd['bd_data_container'], dict) else None
  if not isinstance(entries, dict):
    raise RecordError(f"{file}: bd_test['bd_data_container'] has no data_dict")
  entries = {int(k): v for k, v in entries.items()}
  order = bd.get('original_index_array')
  order = sorted(entries) if order is None else [int(i) for i in np.asarray(order).ravel()]
  absent = [i for i in order if i not in entries]
  if absent:
    raise RecordError(f'{file}: bd_test lists {len(absent)} test images without a poisoned '
                      f'file (first: index {absent[0]}); nad-jax reads poisoned images only')
  images, labels, originals = [], [], []
  for i in order:
    entry = entries[i]
    try:
      label, original = (int(v) for v in list(entry['other_info'])[:2])
      stored = entry['path']
    except (KeyError, TypeError, ValueError):
      raise RecordError(f"{file}: bd_test entry {i} lacks 'path' or 'other_info' "
                        '[backdoor label, original label]') from None
    images.append(read_image(_stored_image(stored, folder), image_shape))
    labels.append(label)
    originals.append(original)
  return BackdoorTest(_stack(images, image_shape), np.asarray(labels, np.int32),
                      np.asarray(originals, np.int32), np.asarray(order, np.int64))


def _v1_test(bd: dict, file: str, image_shape) -> BackdoorTest:
  """bd_test of the v1 branch: the images themselves, with labels and indices."""
  try:
    images, labels = bd['x'], bd['y']
    originals, index = bd['original_targets'], bd['original_index']
  except KeyError as e:
    raise RecordError(f'{file}: bd_test lacks {e}') from None
  if images is None or not len(images) == len(labels) == len(originals) == len(index):
    raise RecordError(f"{file}: bd_test's x, y, original_targets and original_index differ "
                      'in length')
  arrays = [_to_array(image, image_shape, f'{file} bd_test x[{i}]')
            for i, image in enumerate(images)]
  return BackdoorTest(_stack(arrays, image_shape), np.asarray(labels, np.int32).ravel(),
                      np.asarray(originals, np.int32).ravel(), np.asarray(index, np.int64).ravel())


def _stack(images: list, image_shape) -> np.ndarray:
  return np.stack(images) if images else np.zeros((0, *image_shape), np.uint8)


def _image_shape(content: dict, file: str) -> tuple[int, int, int]:
  try:
    height, width, channels = (int(v) for v in content['img_size'])
  except (TypeError, ValueError):
    raise RecordError(f"{file}: img_size {content['img_size']!r} is not (H, W, C)") from None
  return height, width, channels


def bd_test_of(content: dict, path: str) -> BackdoorTest:
  """The poisoned test set of a record's content (`load_result`).

  Args:
    content: the attack_result.pt dict.
    path: the record folder or its attack_result.pt (PNG files are read from the folder).

  Returns:
    The BackdoorTest, images at the record's img_size.

  Raises:
    RecordError: bd_test is in neither layout, an entry lacks its labels or path,
      or an image file is missing or unreadable.
  """
  file = result_file(path)
  bd = content['bd_test']
  image_shape = _image_shape(content, file)
  if isinstance(bd, dict) and 'bd_data_container' in bd:
    return _container_test(bd, os.path.dirname(os.path.abspath(file)), file, image_shape)
  if isinstance(bd, dict) and 'x' in bd:
    return _v1_test(bd, file, image_shape)
  raise RecordError(f"{file}: bd_test has neither 'bd_data_container' (BackdoorBench main/v2) "
                    "nor 'x' (v1)")


def read_bd_test(path: str) -> BackdoorTest:
  """A record's poisoned test set, without its model.

  Args:
    path: the record folder (record/<name>) or its attack_result.pt.

  Returns:
    The BackdoorTest.

  Raises:
    RecordError: as `load_result` and `bd_test_of`.
  """
  return bd_test_of(load_result(path), path)


def read_record(path: str) -> Record:
  """A BackdoorBench record: its model as nad-jax variables, normalisation and poisoned test set.

  Args:
    path: the record folder (record/<name>) or its attack_result.pt.

  Returns:
    The Record.

  Raises:
    RecordError: as `read_bd_test`; a model_name without a nad-jax counterpart
      (MODELS), a clean_data without a known normalisation (NORMALIZATION), or a
      state_dict that does not fit the model (torch_io's message: missing,
      unexpected and mis-shaped entries).
  """
  file = result_file(path)
  content = load_result(path)
  name, dataset = content['model_name'], content['clean_data']
  if name not in MODELS:
    raise RecordError(f'{file}: model_name {name!r} has no nad-jax counterpart; '
                      f'supported: {sorted(MODELS)}')
  if dataset not in NORMALIZATION:
    raise RecordError(f'{file}: clean_data {dataset!r} has no known input normalisation; '
                      f'supported: {sorted(NORMALIZATION)}')
  num_classes, image_shape = int(content['num_classes']), _image_shape(content, file)
  model = models.build_model(MODELS[name], num_classes)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               train=False))
  try:
    variables = torch_io.from_state_dict(torch_io.numpy_state_dict(content['model'], file),
                                         abstract, file)
  except CheckpointError as e:
    raise RecordError(str(e)) from None
  mean, std = NORMALIZATION[dataset] or (None, None)
  return Record(os.path.dirname(os.path.abspath(file)), MODELS[name], num_classes, image_shape,
                dataset, mean, std, variables, bd_test_of(content, path))


def _csv_value(entry: dict, key: str, column: str) -> str:
  """A history value as BackdoorBench writes it: a fraction for accuracies, 'nan_value' for NaN."""
  if key not in entry:
    return ''
  value = float(entry[key])
  if math.isnan(value):
    return 'nan_value'
  return str(int(value)) if column == 'epoch' else repr(value / 100)


def write_defense_result(record_dir: str, defense: str, variables: dict, model_name: str,
                         num_classes: int, history: Sequence[dict]) -> str:
  """Writes a cleaned model into a record, as BackdoorBench's defenses do.

  Files: record_dir/defense/<defense>/defense_result.pt, a torch.save'd dict
  {'model_name': BackdoorBench's name, 'num_classes', 'model': a state_dict that
  loads into BackdoorBench's model with strict=True}, and <defense>_df.csv beside
  it: one row per history entry, an unnamed index column (as pandas writes it),
  then the CSV_COLUMNS (epoch; test_acc, test_asr, test_ra as fractions).

  Args:
    record_dir: the record folder (record/<name>) or its attack_result.pt.
    defense: the defense's name (e.g. 'nad'): the folder and the CSV's prefix.
    variables: the cleaned model's {'params', 'batch_stats'}.
    model_name: nad-jax's registry name (a value of MODELS) or BackdoorBench's (a key).
    num_classes: the number of classes.
    history: per-epoch dicts with 'epoch' and 'acc', 'asr', 'ra' in percent
      (missing keys give empty cells, NaN gives 'nan_value').

  Returns:
    The folder written (record_dir/defense/<defense>).

  Raises:
    RecordError: a model_name BackdoorBench has no name for, or torch missing.
  """
  names = {**{ours: theirs for theirs, ours in MODELS.items()}, **{k: k for k in MODELS}}
  if model_name not in names:
    raise RecordError(f'model {model_name!r} has no BackdoorBench name; supported: '
                      f'{sorted(names)}')
  record_dir = os.path.dirname(os.path.abspath(result_file(record_dir)))
  folder = os.path.join(record_dir, 'defense', defense)
  os.makedirs(folder, exist_ok=True)
  file = os.path.join(folder, 'defense_result.pt')
  torch_io.write_file({'model_name': names[model_name], 'num_classes': int(num_classes),
                       'model': torch_io.torch_state_dict(jax.device_get(variables), file)}, file)
  with open(os.path.join(folder, f'{defense}_df.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['', *CSV_COLUMNS])
    for row, entry in enumerate(history):
      writer.writerow([row, *(_csv_value(entry, key, column)
                              for column, key in CSV_COLUMNS.items())])
  return folder
