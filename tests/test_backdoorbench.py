"""BackdoorBench records (nad_jax.backdoorbench) built as BackdoorBench builds them, and the 'files' attack on them."""

import csv
import os

import jax
import numpy as np
import pytest

from nad_jax import backdoorbench, defaults, models, train
from nad_jax.attacks import build_attack

torch = pytest.importorskip('torch', reason="torch is not installed (pip install 'nad-jax[torch]')")
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch_models import TorchPreActResNet18, randomize  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPE = (32, 32, 3)
TARGET = 0
NAME = '20240101_000000_badnet_attack_xyz1'
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


@pytest.fixture(scope='module')
def data():
  """A clean test split of 24 images, its triggered copy (a white 3x3 patch) and a PyTorch model."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, *SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 10, 24).astype(np.int32)
  labels[:3] = TARGET  # some target-class images, which bd_test leaves out
  triggered = images.copy()
  triggered[:, -4:-1, -4:-1] = 255
  torch.manual_seed(1)  # PyTorch's own initialisation of the convolutions
  model = randomize(TorchPreActResNet18(), seed=1)
  with torch.no_grad():  # raise the target's bias until about half the triggered images get it
    logits = model(normalized(triggered)).numpy()
    margin = np.max(np.delete(logits, TARGET, axis=1), axis=1) - logits[:, TARGET]
    model.linear.bias[TARGET] += float(np.median(margin)) + 1e-3
  return images, labels, triggered, model


def normalized(images):
  """uint8 NHWC -> the model's input, as BackdoorBench's test transform (ToTensor, Normalize)."""
  x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
  return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def write_record(root, layout, data, model_name='preactresnet18', extra=None):
  """record/<NAME>/attack_result.pt and its PNGs, laid out as BackdoorBench's `layout` branch saves them.

  'main': stored paths relative to BackdoorBench's working folder; 'v2': absolute paths
  of the machine that made the record (elsewhere); 'v1': the images inside the file.
  numpy indices, arrays and labels as BackdoorBench's datasets produce them.
  """
  images, labels, triggered, model = data
  folder = root / 'record' / NAME
  folder.mkdir(parents=True)
  index = np.arange(len(images))
  poison_indicator = np.zeros(len(images))
  poison_indicator[labels != TARGET] = 1
  selected = index[poison_indicator == 1]
  if layout == 'v1':
    bd_test = {'x': [Image.fromarray(triggered[i]) for i in selected],
               'y': np.full(len(selected), TARGET), 'original_index': selected,
               'original_targets': labels[selected].astype(np.int64)}
  else:
    prefix = '../record' if layout == 'main' else '/home/someone/BackdoorBench/record'
    save_folder = f'{prefix}/{NAME}/bd_test_dataset'
    data_dict = {}
    for i in selected:
      (folder / 'bd_test_dataset' / str(labels[i])).mkdir(parents=True, exist_ok=True)
      Image.fromarray(triggered[i]).save(folder / 'bd_test_dataset' / str(labels[i]) / f'{i}.png')
      data_dict[i] = {'path': f'{save_folder}/{labels[i]}/{i}.png',
                      'other_info': [TARGET, int(labels[i])]}
    bd_test = {'bd_data_container': {'save_folder_path': save_folder, 'data_dict': data_dict,
                                     'save_file_format': '.png'},
               'getitem_all': True, 'getitem_all_switch': False,
               'original_index_array': selected, 'poison_indicator': poison_indicator,
               'save_folder_path': save_folder}
  state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}  # DataParallel
  torch.save({'model_name': model_name, 'num_classes': 10, 'model': state_dict,
              'data_path': '../data/cifar10', 'img_size': [32, 32, 3], 'clean_data': 'cifar10',
              'bd_train': None, 'bd_test': bd_test, **(extra or {})},
             folder / 'attack_result.pt')
  return folder


def torch_predictions(model, images):
  with torch.no_grad():
    return model(normalized(images)).argmax(-1).numpy()


def files_attack(path):
  config = defaults.paper_config().attack
  config.name, config.target_label, config.path = 'files', TARGET, str(path)
  return build_attack(config, 10, SHAPE)


@pytest.mark.parametrize('layout', ['main', 'v2', 'v1'])
def test_record_is_read_as_saved(layout, data, tmp_path):
  images, labels, triggered, _ = data
  folder = write_record(tmp_path, layout, data)
  test = backdoorbench.read_bd_test(str(folder))
  kept = labels != TARGET
  np.testing.assert_array_equal(test.images, triggered[kept])
  np.testing.assert_array_equal(test.labels, np.full(kept.sum(), TARGET))
  np.testing.assert_array_equal(test.original_labels, labels[kept])
  np.testing.assert_array_equal(test.index, np.flatnonzero(kept))
  assert test.images.dtype == np.uint8 and test.labels.dtype == np.int32


def test_metrics_on_a_record_match_pytorch(data, tmp_path):
  """acc on the clean split, asr and ra on the record's PNGs: nad-jax == PyTorch within 0.05."""
  images, labels, _, model = data
  folder = write_record(tmp_path, 'main', data)
  record = backdoorbench.read_record(str(folder / 'attack_result.pt'))
  assert (record.model_name, record.num_classes, record.image_shape, record.dataset) == (
      'preact_resnet18', 10, SHAPE, 'cifar10')
  assert (record.mean, record.std) == (MEAN, STD)
  flax_model = models.build_model(record.model_name, record.num_classes)
  mesh = train.make_mesh()
  attack = files_attack(folder)
  evaluate = train.make_evaluate(flax_model, mesh, train.normalizer(record.mean, record.std),
                                 attack)
  metrics = jax.device_get(evaluate(record.variables,
                                    train.make_test_set(images, labels, 8, mesh, attack),
                                    jax.random.key(0)))
  pngs = np.stack([np.asarray(Image.open(folder / 'bd_test_dataset' / str(labels[i]) / f'{i}.png'))
                   for i in np.flatnonzero(labels != TARGET)])
  clean, poisoned = torch_predictions(model, images), torch_predictions(model, pngs)
  originals = labels[labels != TARGET]
  expected = {'acc': 100 * np.mean(clean == labels),
              'asr': 100 * np.mean(poisoned == TARGET),
              'ra': 100 * np.mean(poisoned == originals)}
  assert 20 < expected['asr'] < 80 and 0 < expected['acc'] < 100  # not a constant model
  for name, value in expected.items():
    assert abs(float(metrics[name]) - value) <= 0.05, (name, metrics, expected)


def test_defense_result_loads_strictly_into_pytorch(data, tmp_path):
  images, _, _, model = data
  folder = write_record(tmp_path, 'main', data)
  record = backdoorbench.read_record(str(folder))
  history = [{'epoch': 0, 'acc': 81.25, 'acc_nontarget': 80.0, 'asr': 100.0, 'ra': 0.0},
             {'epoch': 1, 'acc': 80.5, 'asr': 2.25, 'ra': float('nan'), 'ce': 0.4}]
  written = backdoorbench.write_defense_result(str(folder), 'nad', record.variables,
                                               record.model_name, 10, history)
  assert written == str(folder / 'defense' / 'nad')
  result = torch.load(folder / 'defense' / 'nad' / 'defense_result.pt', weights_only=True)
  assert (result['model_name'], result['num_classes']) == ('preactresnet18', 10)
  cleaned = TorchPreActResNet18()
  cleaned.load_state_dict(result['model'], strict=True)
  x = torch.from_numpy(images[:4].astype(np.float32) / 255).permute(0, 3, 1, 2)
  with torch.no_grad():
    np.testing.assert_allclose(cleaned.eval()(x).numpy(), model(x).numpy(), atol=1e-5)
  with open(folder / 'defense' / 'nad' / 'nad_df.csv', newline='') as f:
    rows = list(csv.reader(f))
  assert rows == [['', 'epoch', 'test_acc', 'test_asr', 'test_ra'],
                  ['0', '0', '0.8125', '1.0', '0.0'],
                  ['1', '1', '0.805', '0.0225', 'nan_value']]


class Custom:
  """A class of the test module: torch.save pickles it by reference."""


def write_malicious(path):
  """A pickle that would run a shell command if unpickled without weights_only."""
  path.write_bytes(b"cos\nsystem\n(S'touch " + str(path).encode() + b".pwned'\ntR.")


@pytest.mark.parametrize('case, fragment', [
    ('custom', r'attack_result.pt is not a BackdoorBench record nad-jax can read safely .*'
               r'Unsupported global: GLOBAL .*Custom'),
    ('malicious', 'not a BackdoorBench record nad-jax can read safely .*os.system'),
    ('missing_png', r'bd_test_dataset/[1-9]/\d+.png does not exist'),
    ('unknown_model', r"model_name 'convnext_tiny' has no nad-jax counterpart"),
    ('no_bd_test', r"is not a BackdoorBench attack result: it lacks \['bd_test'\]"),
])
def test_bad_records_are_refused_in_one_line(case, fragment, data, tmp_path):
  if case == 'custom':
    folder = write_record(tmp_path, 'main', data, extra={'args': Custom()})
  elif case == 'unknown_model':
    folder = write_record(tmp_path, 'main', data, model_name='convnext_tiny')
  else:
    folder = write_record(tmp_path, 'main', data)
  file = folder / 'attack_result.pt'
  if case == 'malicious':
    write_malicious(file)
  elif case == 'missing_png':
    png = next((folder / 'bd_test_dataset').rglob('*.png'))
    png.unlink()
  elif case == 'no_bd_test':
    content = torch.load(file, weights_only=False)
    del content['bd_test']
    torch.save(content, file)
  with pytest.raises(backdoorbench.RecordError, match=fragment) as error:
    backdoorbench.read_record(str(folder))
  message = str(error.value)
  assert '\n' not in message and len(message) < 500
  for banned in ('weights_only=False', 'add_safe_globals', 'Traceback'):
    assert banned not in message
  assert not os.path.exists(f'{file}.pwned')


def test_files_attack_error_names_the_field(data, tmp_path):
  folder = write_record(tmp_path, 'main', data)
  config = defaults.paper_config().attack
  config.name, config.target_label, config.path = 'files', 3, str(folder)
  with pytest.raises(ValueError, match=r"attack.path .*: backdoor labels disagree with "
                                       r"attack.mode 'all_to_one' / attack.target_label 3"):
    build_attack(config, 10, SHAPE)
  next((folder / 'bd_test_dataset').rglob('*.png')).unlink()
  config.target_label = TARGET
  with pytest.raises(ValueError, match=r'^attack.path: .*\.png does not exist'):
    build_attack(config, 10, SHAPE)
