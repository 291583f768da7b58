"""PyTorch checkpoint import/export (nad_jax.torch_io) against PyTorch reference models."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nad_jax import attacks, models, stages, torch_io, train
from nad_jax.checkpoint import CheckpointError
from nad_jax.models.preact_resnet import PreActResNet18
from nad_jax import defaults

torch = pytest.importorskip('torch', reason="torch is not installed (pip install 'nad-jax[torch]')")
from torch_models import TorchPreActResNet18, TorchWideResNet, randomize  # pylint: disable=g-import-not-at-top,wrong-import-position

DATA = Path(__file__).parents[1] / '..' / 'shared' / 'data'


PAIRS = {  # name: (Flax module, PyTorch reference)
    'wrn16_1': (lambda: models.build_model('wrn16_1', 10), lambda: TorchWideResNet(16, 1)),
    'wrn16_2': (lambda: models.build_model('wrn16_2', 10), lambda: TorchWideResNet(16, 2)),
    'preact_resnet18': (lambda: PreActResNet18(), lambda: TorchPreActResNet18()),
    'preact_resnet18_bn': (lambda: PreActResNet18(head_norm=True),
                           lambda: TorchPreActResNet18(head_norm=True)),
}


def abstract_of(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def logits(model, variables, x_nchw):
  flax_out = model.apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False)
  return np.asarray(flax_out)


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize('name', sorted(PAIRS))
def test_imported_logits_match_pytorch(name, tmp_path):
  flax_model, torch_model = PAIRS[name][0](), randomize(PAIRS[name][1]())
  path = tmp_path / 'model.pth'
  torch.save({'state_dict': torch_model.state_dict(), 'epoch': 3}, path)
  variables = torch_io.load(str(path), abstract_of(flax_model))
  x = np.random.default_rng(0).uniform(size=(4, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(logits(flax_model, variables, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['wrn16_1', 'preact_resnet18_bn'])
def test_flax_to_pytorch_to_flax_is_exact(name, tmp_path):
  flax_model, torch_model = PAIRS[name][0](), PAIRS[name][1]()
  variables = flax_model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(2)  # random BatchNorm statistics (init gives 0 and 1)
  variables = jax.tree.map(np.asarray, variables)
  variables['batch_stats'] = jax.tree.map(
      lambda v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32), variables['batch_stats'])
  path = tmp_path / 'exported.pth'
  torch_io.save(variables, str(path))
  back = torch_io.load(str(path), abstract_of(flax_model))
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  # The export is a complete PyTorch state_dict that computes the same function.
  torch_model.load_state_dict(torch.load(path, weights_only=True), strict=True)
  x = np.random.default_rng(1).uniform(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(logits(flax_model, variables, x), expected,
                             atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_dataparallel_prefix_and_plain_dict(tmp_path):
  torch_model = randomize(TorchWideResNet(16, 1))
  path = tmp_path / 'dp.pt'
  torch.save({f'module.{k}': v for k, v in torch_model.state_dict().items()}, path)
  variables = torch_io.load(str(path), abstract_of(models.build_model('wrn16_1', 10)))
  np.testing.assert_array_equal(variables['params']['fc']['bias'],
                                torch_model.fc.bias.detach().numpy())


def test_bad_keys_and_shapes_name_them():
  abstract = abstract_of(models.build_model('wrn16_1', 10))
  state = {k: v.numpy() for k, v in TorchWideResNet(16, 1).state_dict().items()}
  del state['block2.layer.0.convShortcut.weight']
  state['block9.extra.weight'] = np.zeros(3)
  state['fc.weight'] = np.zeros((7, 64))
  with pytest.raises(CheckpointError) as error:
    torch_io.from_state_dict(state, abstract, 'bad.pth')
  message = str(error.value)
  for part in ('bad.pth', 'missing (1): block2.layer.0.convShortcut.weight',
               'unexpected (1): block9.extra.weight', 'fc.weight (7, 64) (expected (10, 64))'):
    assert part in message
  # A PreAct-ResNet checkpoint for a WideResNet config: the error says so, briefly.
  preact = {k: v.numpy() for k, v in TorchPreActResNet18().state_dict().items()}
  with pytest.raises(CheckpointError, match=r'unexpected \(\d+\): .*\.\.\. and \d+ more'):
    torch_io.from_state_dict(preact, abstract)


class Custom:
  """A class of the test module: torch.save pickles it by reference, as any user class."""


def write_custom_class(path):
  torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': Custom()}, path)


def write_truncated_zip(path):
  torch.save(TorchWideResNet(16, 1).state_dict(), path)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def write_malicious(path):
  """A pickle that would run a shell command if unpickled without weights_only."""
  path.write_bytes(b"cos\nsystem\n(S'touch " + str(path).encode() + b".pwned'\ntR.")


UNREADABLE = {  # file name: (writer, what the message says)
    'student.checkpoint': (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                           'not a PyTorch checkpoint nad-jax can read safely'),
    'empty.pth': (lambda p: p.write_bytes(b''), 'is an empty file'),
    'notes.txt': (lambda p: p.write_text('epoch 3: acc 91.2\nepoch 4: acc 91.5\n'),
                  'not a PyTorch checkpoint nad-jax can read safely'),
    'custom.pth': (write_custom_class, 'Unsupported global: GLOBAL .*Custom'),
    'truncated.pth': (write_truncated_zip, 'not a PyTorch checkpoint nad-jax can read safely'),
    'malicious.pt': (write_malicious, 'unsupported GLOBAL os.system'),
    'folder.pth': (lambda p: p.mkdir(), 'is a folder, not a PyTorch checkpoint file'),
    'missing.pth': (lambda p: None, 'does not exist'),
}


@pytest.mark.parametrize('name', sorted(UNREADABLE))
def test_unreadable_file_is_one_line_without_unsafe_advice(name, tmp_path):
  write, fragment = UNREADABLE[name]
  path = tmp_path / name
  write(path)
  with pytest.raises(CheckpointError, match=fragment) as error:
    torch_io.load(str(path), abstract_of(models.build_model('tiny', 10)))
  message = str(error.value)
  assert str(path) in message
  assert '\n' not in message and len(message) < 500
  for banned in ('weights_only=False', 'Traceback', 'add_safe_globals'):
    assert banned not in message
  assert not os.path.exists(f'{path}.pwned')


@pytest.mark.parametrize('name', ['model.ckpt', 'student.checkpoint', 'weights'])
def test_any_file_name_is_read(name, tmp_path):
  torch_model = randomize(TorchWideResNet(16, 1))
  torch.save(torch_model.state_dict(), tmp_path / name)
  variables = torch_io.load(str(tmp_path / name), abstract_of(models.build_model('wrn16_1', 10)))
  np.testing.assert_array_equal(variables['params']['fc']['bias'],
                                torch_model.fc.bias.detach().numpy())


def test_file_without_a_state_dict(tmp_path):
  torch.save([1, 2], tmp_path / 'list.pth')
  with pytest.raises(CheckpointError, match='list.pth holds no state_dict'):
    torch_io.load(str(tmp_path / 'list.pth'), abstract_of(models.build_model('tiny', 10)))


def test_pipeline_loads_a_pytorch_file_whatever_its_name(tmp_path):
  """stages.load_checkpoint() reads a file through torch_io; a bad one is a ConfigError."""
  model = models.build_model('tiny', 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  torch_io.save(variables, str(tmp_path / 'tiny.ckpt'))
  loaded = stages.load_checkpoint(str(tmp_path / 'tiny.ckpt'), abstract_of(model),
                                    'teacher.checkpoint')
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(variables))
  torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'bad.pth')
  with pytest.raises(stages.ConfigError, match='teacher.checkpoint: .*bad.pth.*missing'):
    stages.load_checkpoint(str(tmp_path / 'bad.pth'), abstract_of(model), 'teacher.checkpoint')


def read_test_split(root: Path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
  files = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())]
  images = np.stack([np.asarray(Image.open(f).convert('RGB')) for f, _ in files])
  return images, np.asarray([label for _, label in files], np.int32)


AUTHORS_CHECKPOINTS = {'S (backdoored)': 'WRN-16-1-S-model_best.pth.tar',
                       'T (teacher)': 'WRN-16-1-T-model_best.pth.tar',
                       "authors' NAD-erased": 'WRN-16-1-NAD-erased.pth.tar'}


def quoted_checkpoint_figures() -> dict:
  """{row: (acc, acc_nontarget, asr, PyTorch's 'acc / asr')} of docs/reproduction.md's table
  of the authors' checkpoints."""
  with open(Path(__file__).parents[1] / 'docs' / 'reproduction.md') as f:
    rows = [row.strip('|').split('|') for row in f.read().splitlines()
            if row.startswith('| ') and row.split('|')[1].strip() in AUTHORS_CHECKPOINTS]
  return {cells[0].strip(): tuple(c.strip() for c in cells[1:5]) for cells in rows}


@pytest.mark.slow  # reads and evaluates the 10,000 test JPEGs, three times
def test_the_authors_checkpoints_give_the_figures_the_docs_quote():
  """The authors' S, T and NAD-erased checkpoints, imported, give docs/reproduction.md's acc,
  acc_nontarget and ASR, and PyTorch's figures (../shared/data/README.md, within 0.05)."""
  test_dir = DATA / 'cifar10-jpeg' / 'test'
  if not all((DATA / 'nad-official' / f).is_file() for f in AUTHORS_CHECKPOINTS.values()) \
      or not test_dir.is_dir():
    pytest.skip(f'needs the authors\' checkpoints and {test_dir} (../shared/data is absent)')
  quoted = quoted_checkpoint_figures()
  assert sorted(quoted) == sorted(AUTHORS_CHECKPOINTS)
  model = models.build_model('wrn16_1', 10)
  images, labels = read_test_split(test_dir)
  assert images.shape == (10_000, 32, 32, 3)
  mesh = train.make_mesh()
  attack = attacks.build_attack(defaults.paper_config().attack, 10, (32, 32, 3))
  evaluate = train.make_evaluate(model, mesh, train.normalizer(None, None), attack)
  test_set = train.make_test_set(images, labels, 1000, mesh, attack)
  for row, name in AUTHORS_CHECKPOINTS.items():
    variables = torch_io.load(str(DATA / 'nad-official' / name), abstract_of(model))
    metrics = jax.device_get(evaluate(variables, test_set, jax.random.key(0)))
    measured = tuple(f'{float(metrics[k]):.2f}' for k in ('acc', 'acc_nontarget', 'asr'))
    assert measured == quoted[row][:3], row
    pytorch_acc, pytorch_asr = map(float, quoted[row][3].split(' / '))
    assert abs(float(metrics['acc']) - pytorch_acc) <= 0.05, row
    assert abs(float(metrics['asr']) - pytorch_asr) <= 0.05, row


def test_export_cli_writes_a_stage_as_pth(tmp_path):
  """python -m nad_jax.torch_io export WORKDIR/nad OUT.pth, on a stage the pipeline wrote."""
  import optax  # pylint: disable=g-import-not-at-top
  from nad_jax.checkpoint import StageCheckpoints  # pylint: disable=g-import-not-at-top
  model = models.build_model('tiny', 10)
  variables = jax.device_get(model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
  stage = StageCheckpoints(str(tmp_path / 'nad'))
  stage.save(1, train.state_from_variables(variables, optax.sgd(0.1)), [])
  stage.close()
  torch_io.main(['export', str(tmp_path / 'nad'), str(tmp_path / 'nad_model.pth'),
                 '--model', 'tiny'])
  back = torch_io.load(str(tmp_path / 'nad_model.pth'), abstract_of(model))
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  with pytest.raises(SystemExit, match='error: .*does not fit'):
    torch_io.main(['export', str(tmp_path / 'nad'), str(tmp_path / 'x.pth'), '--model', 'wrn16_1'])
