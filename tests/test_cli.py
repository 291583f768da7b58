"""nad-jax-clean (nad_jax/cli.py): the installed command, run from a folder outside the
repository on tiny data, its outputs, and one clear error per kind of bad input."""

import importlib
import json
import os
import re
import subprocess
import sys
import types
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nad_jax import cli, defaults, models, stages, torch_io
from nad_jax.experiments import clean

torch = pytest.importorskip('torch', reason="torch is not installed (pip install 'nad-jax[torch]')")
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch_models import TorchPreActResNet18, randomize  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 3)
CLASSES = 3
TARGET = 0
# Tiny schedules: one epoch, batches of 8 (a multiple of the 4 forced CPU devices); a teacher
# trained here takes TEACHER too.
QUICK = ['--epochs', '1', '--batch-size', '8', '--clean-fraction', '1',
         '--set', 'data.eval_batch_size=8', '--attention-images', '2']
TEACHER = ['--teacher-epochs', '1']


def write_folder(root: Path, train: int = 8, test: int = 4) -> Path:
  """An ImageFolder tree root/{train,test}/c<k>/<i>.png of random 32x32 RGB images."""
  rng = np.random.default_rng(0)
  for split, count in (('train', train), ('test', test)):
    for k in range(CLASSES):
      folder = root / split / f'c{k}'
      folder.mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, SHAPE, dtype=np.uint8)).save(folder / f'{i}.png')
  return root


def write_tiny_pth(path: Path) -> Path:
  """A PyTorch state_dict of nad-jax's `tiny` net (WideResNet names), randomly initialised."""
  model = models.build_model('tiny', CLASSES)
  variables = model.init(jax.random.key(1), jnp.zeros((1, *SHAPE)), train=False)
  torch_io.save(jax.device_get(variables), str(path))
  return path


def write_record(root: Path) -> Path:
  """A BackdoorBench record (v1 layout: bd_test images inside the file) of a PreActResNet18
  with random weights, 3 classes, all-to-one target 0, 6 poisoned test images."""
  folder = root / 'record' / 'badnet_tiny'
  folder.mkdir(parents=True)
  model = randomize(TorchPreActResNet18(num_classes=CLASSES), seed=2)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6, *SHAPE), dtype=np.uint8)
  images[:, -4:-1, -4:-1] = 255
  originals = np.array([1, 2, 1, 2, 1, 2])
  bd_test = {'x': list(images), 'y': np.full(6, TARGET), 'original_index': np.arange(6),
             'original_targets': originals}
  torch.save({'model_name': 'preactresnet18', 'num_classes': CLASSES,
              'model': {f'module.{k}': v for k, v in model.state_dict().items()},
              'data_path': '../data/cifar10', 'img_size': list(SHAPE), 'clean_data': 'cifar10',
              'bd_train': None, 'bd_test': bd_test}, folder / 'attack_result.pt')
  return folder


def run_command(args, cwd: Path) -> subprocess.CompletedProcess:
  """`python -m nad_jax.cli ARGS` in `cwd`, importing nad_jax from this checkout."""
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  return subprocess.run([sys.executable, '-m', 'nad_jax.cli', *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """A tiny image folder and a tiny PyTorch model, outside the repository."""
  root = tmp_path_factory.mktemp('inputs')
  return write_folder(root / 'data'), write_tiny_pth(root / 'tiny.pth')


def test_console_script_is_declared_and_resolves():
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  module, _, function = scripts['nad-jax-clean'].partition(':')
  assert getattr(importlib.import_module(module), function) is cli.main


def test_help_names_every_option_and_its_field(tmp_path):
  result = run_command(['--help'], tmp_path)
  assert result.returncode == 0, result.stderr
  for option in ('--data', '--arch', '--poisoned', '--attack', '--target-label', '--method',
                 '--epochs', '--out', '--set', '[student.checkpoint]', '[model.name]',
                 '[teacher.epochs]'):
    assert option in result.stdout, option


def test_method_mcr_options_set_the_curve_recipe(tmp_path):
  """With --method mcr, --epochs, --batch-size, --lr and --eval-every set the curve's
  mcr.* (NAD's schedule still trains its FT end) and --set reaches any mcr field."""
  model = tmp_path / 'model.pth'
  model.touch()
  data = write_folder(tmp_path / 'data', train=1, test=1)
  argv = [str(model), '--arch', 'tiny', '--data', str(data), '--attack', 'badnets',
          '--target-label', '0', '--method', 'mcr', '--epochs', '7', '--batch-size', '16',
          '--lr', '0.02', '--eval-every', '7', '--set', 'mcr.samples_per_epoch=500']
  config, _ = cli.build_config(cli.parser().parse_args(argv))
  assert (config.mcr.epochs, config.mcr.batch_size, config.mcr.learning_rate,
          config.mcr.eval_every, config.mcr.samples_per_epoch) == (7, 16, 0.02, 7, 500)
  fresh = defaults.paper_config()
  assert config.nad.to_dict() == fresh.nad.to_dict()
  assert config.teacher.to_dict() == fresh.teacher.to_dict()


def test_method_fp_fields_are_settable(tmp_path):
  """With --method fp, --set reaches FP's own fields and the run reads them (NAD's schedule,
  which FP otherwise follows, is left as it was)."""
  model = tmp_path / 'model.pth'
  model.touch()
  data = write_folder(tmp_path / 'data', train=1, test=1)
  argv = [str(model), '--arch', 'tiny', '--data', str(data), '--attack', 'badnets',
          '--target-label', '0', '--method', 'fp', '--set', 'fp.epochs=2',
          '--set', 'fp.acc_drop=3.0']
  config, _ = cli.build_config(cli.parser().parse_args(argv))
  assert (config.fp.epochs, config.fp.acc_drop, config.nad.epochs) == (2, 3.0, 20)
  clean.refuse_ignored_fields(config, 'fp', ('fp',))  # FP reads them: nothing refused


@pytest.mark.slow
def test_method_mcr_records_the_ft_stage_it_trains(inputs, tmp_path):
  """MCR's curve ends at the FT model it fine-tunes first: results.json (stages, history,
  timing) and report.md record that FT stage with its epochs, beside the curve's."""
  data, model = inputs
  result = run_command([model, '--arch', 'tiny', '--data', data, '--attack', 'badnets',
                        '--target-label', TARGET, '--out', 'out', '--method', 'mcr', *QUICK,
                        '--set', 'nad.epochs=1', '--set', 'nad.batch_size=8',
                        '--set', 'mcr.samples_per_epoch=24', '--set', 'mcr.points=3'],
                       tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[ft] epoch 1/1' in result.stdout
  out = tmp_path / 'out'
  results = json.loads((out / 'results.json').read_text())
  assert list(results['stages']) == ['backdoored', 'ft', 'mcr']
  assert [h['epoch'] for h in results['history']['ft']] == [0, 1]
  assert results['history']['mcr'][-1]['epoch'] == 1
  assert {'ft', 'mcr'} <= set(results['timing'])
  report = (out / 'report.md').read_text()
  assert '- ft: epochs 1; mcr: epochs 1' in report, report
  assert "| ft (the curve's end) |" in report and '## ft per epoch' in report
  # The curve's ends are not the rows above them (BatchNorm recomputed), and it says so.
  assert '## The curve (MCR)' in report and 'BatchNorm statistics are recomputed' in report
  curve = report.split('## The curve (MCR)')[1].split('\n\n')[2].splitlines()
  assert [row.split(' | ')[0] for row in curve[2:]] == ['| 0', '| 0.3', '| 0.5', '| 1']


@pytest.mark.slow
def test_cleans_a_pytorch_model_from_another_folder(inputs, tmp_path):
  data, model = inputs
  result = run_command([model, '--arch', 'tiny', '--data', data, '--attack', 'badnets',
                        '--target-label', TARGET, '--out', 'out', *QUICK, *TEACHER], tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  out = tmp_path / 'out'
  results = json.loads((out / 'results.json').read_text())
  assert set(results['stages']) == {'backdoored', 'teacher', 'nad'}
  assert [h['epoch'] for h in results['history']['nad']] == [0, 1]
  assert results['input']['model_kind'] == 'PyTorch file'
  assert results['config']['model']['name'] == 'tiny'
  report = (out / 'report.md').read_text()
  assert '| nad (after) |' in report and '![attention maps' in report
  assert (out / 'attention.png').stat().st_size > 0 and (out / 'curves.png').stat().st_size > 0
  assert not (out / 'defense').exists()  # BackdoorBench's files only for a record
  # The cleaned model loads back into nad-jax and is the one evaluated.
  abstract = jax.eval_shape(lambda: models.build_model('tiny', CLASSES).init(
      jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False))
  cleaned = torch_io.load(str(out / 'cleaned.pth'), abstract)
  assert cleaned['params'].keys() == abstract['params'].keys()
  # Rerunning the same command resumes: nothing trains again.
  again = run_command([model, '--arch', 'tiny', '--data', data, '--attack', 'badnets',
                       '--target-label', TARGET, '--out', 'out', *QUICK, *TEACHER], tmp_path)
  assert again.returncode == 0, again.stderr
  assert '[nad] restored, finished at epoch 1' in again.stdout
  assert json.loads((out / 'results.json').read_text())['stages'] == results['stages']


@pytest.mark.slow
def test_a_backdoorbench_record_gets_its_defense_result(inputs, tmp_path):
  """A record as MODEL (and as the teacher, so only NAD trains): its architecture, scaling
  and poisoned test images are used; defense_result.pt loads strictly into PyTorch."""
  data, _ = inputs
  record = write_record(tmp_path)
  result = run_command([record, '--data', data, '--teacher', record, '--out', tmp_path / 'out',
                        *QUICK], tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  out = tmp_path / 'out'
  results = json.loads((out / 'results.json').read_text())
  assert results['config']['model']['name'] == 'preact_resnet18'
  assert tuple(results['config']['model']['mean']) == (0.4914, 0.4822, 0.4465)
  attack = results['config']['attack']
  assert (attack['name'], attack['target_label'], attack['path']) == ('files', TARGET, str(record))
  assert results['stages']['teacher'] == results['stages']['backdoored']
  saved = torch.load(out / 'defense' / 'nad' / 'defense_result.pt', weights_only=True)
  assert (saved['model_name'], saved['num_classes']) == ('preactresnet18', CLASSES)
  TorchPreActResNet18(num_classes=CLASSES).load_state_dict(saved['model'], strict=True)
  rows = (out / 'defense' / 'nad' / 'nad_df.csv').read_text().splitlines()
  assert rows[0] == ',epoch,test_acc,test_asr,test_ra' and len(rows) == 3
  assert not (record / 'defense').exists()  # the record itself is left as it was
  assert results['files']['defense_csv'] == os.path.join('defense', 'nad', 'nad_df.csv')
  # Another method into the same folder: the first one's outputs do not stay beside it.
  ft = run_command([record, '--data', data, '--method', 'ft', '--out', tmp_path / 'out',
                    *QUICK], tmp_path)
  assert ft.returncode == 0, ft.stdout + ft.stderr
  assert sorted(os.listdir(out / 'defense' / 'ft')) == ['defense_result.pt', 'ft_df.csv']
  assert not (out / 'defense' / 'nad' / 'defense_result.pt').exists()
  assert not (out / 'defense' / 'nad' / 'nad_df.csv').exists()


def test_a_record_that_disagrees_with_the_config_is_refused(inputs, tmp_path):
  """stages.check_record: model.name, mean/std and the class count named in one message."""
  data, _ = inputs
  record = write_record(tmp_path)
  config, _ = cli.build_config(cli.parser().parse_args(
      [str(record), '--data', str(data), '--arch', 'wrn16_1']))
  config.model.mean = None
  config.model.std = None
  dataset = stages.data_lib.Dataset(np.zeros((4, *SHAPE), np.uint8), np.arange(4) % 2,
                                    np.zeros((4, *SHAPE), np.uint8), np.arange(4) % 2, 2)
  with pytest.raises(stages.ConfigError) as error:
    stages.make_context(config, dataset, None, ())
  message = str(error.value)
  for fragment in ("student.checkpoint", "model.name 'wrn16_1' (the record: 'preact_resnet18')",
                   'model.mean None (the record: (0.4914', 'model.std None',
                   'the data has 2 classes (the record: 3)'):
    assert fragment in message, message


def test_the_label_map_is_read_from_the_poisoned_labels():
  assert cli.label_map(np.array([0, 0, 0]), np.array([1, 2, 1]), 'x') == ('all_to_one', 0)
  assert cli.label_map(np.array([2, 0, 1, 1]), np.array([1, 2, 0, 1]), 'x') == ('all_to_all', 0)
  with pytest.raises(cli.UsageError, match='neither'):
    cli.label_map(np.array([2, 2, 1]), np.array([0, 1, 2]), 'x')
  with pytest.raises(cli.UsageError, match='no poisoned test image'):
    cli.label_map(np.array([1, 2]), np.array([1, 2]), 'x')


def bad_inputs(tmp_path, data, model):
  """{case: (arguments, a fragment the message must hold)}: one per kind of bad input."""
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  bad_npz = tmp_path / 'bad.npz'
  np.savez(bad_npz, images=np.zeros((2, *SHAPE), np.uint8))
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  no_splits = tmp_path / 'no_splits'
  no_splits.mkdir()
  ok = ['--attack', 'badnets', '--target-label', '0', '--batch-size', '8',
        '--clean-fraction', '1']
  return {
      'missing model': ([tmp_path / 'nope.pth', '--data', data, *ok], 'MODEL'),
      'junk model': ([junk, '--arch', 'tiny', '--data', data, *ok], 'junk.pth'),
      'wrong architecture': ([model, '--arch', 'wrn16_1', '--data', data, *ok], 'model.name'),
      'missing data': ([model, '--arch', 'tiny', '--data', tmp_path / 'nodata', *ok], '--data'),
      'data without splits': ([model, '--arch', 'tiny', '--data', no_splits, *ok], 'no_splits'),
      'missing poisoned': ([model, '--arch', 'tiny', '--data', data, '--poisoned',
                            tmp_path / 'nope.npz'], '--poisoned'),
      'bad poisoned npz': ([model, '--arch', 'tiny', '--data', data, '--poisoned', bad_npz],
                           '--poisoned'),
      'no way to measure asr': ([model, '--arch', 'tiny', '--data', data], '--attack NAME'),
      'unknown attack': ([model, '--arch', 'tiny', '--data', data, '--attack', 'nope'],
                         '--attack'),
      'no target label': ([model, '--arch', 'tiny', '--data', data, '--attack', 'badnets'],
                          '--target-label'),
      'unknown method': ([model, '--arch', 'tiny', '--data', data, *ok, '--method', 'x'],
                         '--method'),
      'unknown architecture': ([model, '--arch', 'resnet99', '--data', data, *ok], 'model.name'),
      'bad number': ([model, '--arch', 'tiny', '--data', data, *ok, '--epochs', 'two'],
                     '--epochs'),
      'bad value': ([model, '--arch', 'tiny', '--data', data, *ok, '--epochs', '-1'],
                    'nad.epochs -1'),
      'bad mean': ([model, '--arch', 'tiny', '--data', data, *ok, '--mean', 'a,b', '--std',
                    '1,1'], '--mean'),
      'unknown field': ([model, '--arch', 'tiny', '--data', data, *ok, '--set', 'nad.epoch=2'],
                        'did you mean nad.epochs'),
      'mistyped field': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                          'nad.epochs=fast'], 'nad.epochs'),
      'out is a file': ([model, '--arch', 'tiny', '--data', data, *ok, '--out', a_file],
                        'a_file: a file, not a folder'),
      'out below a file': ([model, '--arch', 'tiny', '--data', data, *ok, '--out',
                            os.path.join(a_file, 'sub')], 'a_file is a file'),
      'empty out': ([model, '--arch', 'tiny', '--data', data, *ok, '--out', ''],
                    "the output folder '': name a folder"),

      'batch larger than the clean subset': ([model, '--arch', 'tiny', '--data', data, *ok,
                                              '--clean-fraction', '0.05'],
                                             'teacher.batch_size 8'),
      # Fields the cleaning does not read: refused, not recorded in results.json as if used.
      'several seeds': ([model, '--arch', 'tiny', '--data', data, *ok, '--set', 'seeds=(0,1)'],
                        'seeds (0, 1): nad-jax-clean cleans with one seed'),
      'evaluation only': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                           'eval_only=True'], '--set eval_only: nad-jax-clean has no evaluation'),
      'another runner': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                          'runner=table1'], '--set runner: nad-jax-clean picks its runner'),
      'several processes': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                             'distributed.num_processes=2'],
                            '--set distributed.num_processes: nad-jax-clean runs one process'),
      'a whole section': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                           "data={'path': '/elsewhere'}"], '--set data: a section'),
      'tfds dir without tfds:': ([model, '--arch', 'tiny', '--data', 'cifar10', *ok,
                                  '--tfds-dir', tmp_path], 'write --data tfds:cifar10'),
      'a poison rate': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                         'attack.poison_rate=0.2'],
                        '--set attack.poison_rate: nothing is poisoned here'),
      'betas without distillation': ([model, '--arch', 'tiny', '--data', data, *ok, '--method',
                                      'ft', '--set', 'nad.betas=(1.0,1.0,1.0)'],
                                     'nad.betas (1.0, 1.0, 1.0): --method ft does not distill'),
      'backdoor training': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                             'backdoor_training.epochs=5'],
                            '--set backdoor_training.epochs: the backdoored model is given'),
      "another method's field": ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                                  'fp.epochs=2'], 'fp.epochs 2: --method nad does not use it'),
      "NAD's epochs beside FP's own": ([model, '--arch', 'tiny', '--data', data, *ok, '--method',
                                        'fp', '--set', 'fp.epochs=1', '--epochs', '3'],
                                       '--set fp.epochs: --epochs sets it too; give one'),
      'an option and --set of its field': ([model, '--arch', 'tiny', '--data', data, *ok,
                                            '--epochs', '1', '--set', 'nad.epochs=2'],
                                           '--set nad.epochs: --epochs sets it too; give one'),
      "a NAD field FP does not follow": ([model, '--arch', 'tiny', '--data', data, *ok,
                                          '--method', 'fp', '--set', 'nad.weight_decay=0.5'],
                                         'nad.weight_decay 0.5: --method fp'),
      'teacher epochs of a given teacher': ([model, '--arch', 'tiny', '--data', data, *ok,
                                             '--teacher', model, '--teacher-epochs', '10'],
                                            '--teacher-epochs 10: no teacher is trained here'),
      'a teacher for ft': ([model, '--arch', 'tiny', '--data', data, *ok, '--method', 'ft',
                            '--teacher', model], 'teacher.checkpoint'),
      'a size the folder does not read': ([model, '--arch', 'tiny', '--data', data, *ok,
                                           '--set', 'data.train_size=100'],
                                          'data.train_size 100: the folder source does not'),
      # Fields an option sets: results.json's input would name the option's, not what ran.
      'the model by --set': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                              f'student.checkpoint={model}'],
                             '--set student.checkpoint: it has its own option; give MODEL'),
      'the data by --set': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                             f'data.path={data}'],
                            '--set data.path: it has its own option; give --data'),
      'the trigger by --set': ([model, '--arch', 'tiny', '--data', data, *ok, '--set',
                                'attack.name=blend'],
                               '--set attack.name: it has its own option; give --attack or '
                               '--poisoned'),
      'tfds dir with a folder': ([model, '--arch', 'tiny', '--data', data, *ok, '--tfds-dir',
                                  tmp_path], '--tfds-dir goes with --data tfds:NAME'),
      'a target label for all-to-all': ([model, '--arch', 'tiny', '--data', data, *ok,
                                         '--all-to-all'],
                                        '--target-label 0 and --all-to-all exclude each other'),
  }


CASES = ('missing model', 'junk model', 'wrong architecture', 'missing data',
         'data without splits', 'missing poisoned', 'bad poisoned npz', 'no way to measure asr',
         'unknown attack', 'no target label', 'unknown method', 'unknown architecture',
         'bad number', 'bad value', 'bad mean', 'unknown field', 'mistyped field',
         'out is a file', 'out below a file', 'empty out',
         'batch larger than the clean subset', 'several seeds',
         'evaluation only', 'another runner', 'several processes', 'a whole section',
         'tfds dir without tfds:', 'a poison rate',
         'betas without distillation', 'backdoor training',
         "another method's field", "NAD's epochs beside FP's own",
         'an option and --set of its field',
         'a NAD field FP does not follow', 'teacher epochs of a given teacher', 'a teacher for ft',
         'a size the folder does not read', 'the model by --set', 'the data by --set',
         'the trigger by --set', 'tfds dir with a folder', 'a target label for all-to-all')


@pytest.mark.parametrize('case', CASES)
def test_a_bad_input_is_one_line_and_writes_nothing(case, inputs, tmp_path, capsys,
                                                    monkeypatch):
  data, model = inputs
  args, fragment = bad_inputs(tmp_path, data, model)[case]
  monkeypatch.chdir(tmp_path)
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(SystemExit) as exit_info:
    cli.main([str(a) for a in args])
  message = str(exit_info.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  assert fragment in message, message
  assert 'Traceback' not in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # no ./cleaned, nothing else


@pytest.mark.parametrize('field, value, fragment', [
    ('attack.poison_rate', 0.2, 'attack.poison_rate 0.2: nothing is poisoned here'),
    ('distributed.num_processes', 2, 'distributed.num_processes 2: nad-jax-clean runs one'),
    ('eval_only', True, 'eval_only True: nad-jax-clean has no evaluation-only mode')])
def test_the_runner_refuses_what_a_cleaning_does_not_read(field, value, fragment):
  """The same refusals for a config given to clean.run from Python, not by --set."""
  config = defaults.defense_stages(defaults.paper_config())
  section, _, leaf = field.rpartition('.')
  (config[section] if section else config)[leaf] = value
  with pytest.raises(stages.ConfigError, match=re.escape(fragment)):
    clean.refuse_ignored_fields(config, 'nad', ('teacher', 'nad'))


@pytest.mark.parametrize('mode, shown', [('all_to_one', 'all_to_one (target 5)'),
                                         ('all_to_all', 'all_to_all (y -> y+1)')])
def test_the_report_names_the_label_map_that_ran(mode, shown):
  """An all-to-all backdoor has no target label; the report does not name one."""
  config = defaults.paper_config()
  config.attack.mode, config.attack.target_label = mode, 5
  images = np.zeros((40, *SHAPE), np.uint8)
  ctx = types.SimpleNamespace(
      config=config, attack=types.SimpleNamespace(test_set=None),
      dataset=types.SimpleNamespace(num_classes=10, train_images=images, test_images=images))
  metrics = dict.fromkeys(stages.METRICS, 1.0)
  results = {'input': {'model': 'm.pth'}, 'method': 'ft', 'stages': {'backdoored': metrics},
             'history': {}, 'info': {}, 'files': {}}
  assert f'backdoor label map {shown}' in clean.report(results, ctx)


def test_refools_selection_reads_the_poison_rate():
  """Refool's adversarial selection picks its trigger on data poisoned at poison_rate, so a
  cleaning reads it there (and only there)."""
  config = defaults.defense_stages(defaults.paper_config())
  config.attack.name, config.attack.poison_rate = 'refool', 0.8
  clean.refuse_ignored_fields(config, 'nad', ('teacher', 'nad'))
  config.attack.selection_rounds = 0
  with pytest.raises(stages.ConfigError, match='attack.poison_rate 0.8: nothing is poisoned'):
    clean.refuse_ignored_fields(config, 'nad', ('teacher', 'nad'))


def test_the_runner_refuses_an_unknown_method(tmp_path):
  with pytest.raises(stages.ConfigError, match="method 'nap'"):
    clean.run(defaults.paper_config(), str(tmp_path / 'out'), 'nap')
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('teacher', [True, False], ids=['authors_teacher', 'finetuned_teacher'])
def test_the_documented_command_is_configs_nad_official(tmp_path, teacher):
  """docs/clean.md's command on the authors' model builds configs/nad_official.py's config
  (with --teacher) or its :finetuned_teacher variant's, every field alike but the paths."""
  from configs import nad_official  # pylint: disable=g-import-not-at-top
  student, their_teacher = tmp_path / 'S.pth.tar', tmp_path / 'T.pth.tar'
  student.touch()
  their_teacher.touch()
  data = write_folder(tmp_path / 'cifar10-jpeg', train=1, test=1)
  argv = [str(student), '--arch', 'wrn16_1', '--data', str(data), '--attack', 'badnets',
          '--target-label', '5'] + (['--teacher', str(their_teacher)] if teacher else [])
  built, _ = cli.build_config(cli.parser().parse_args(argv))
  expected = defaults.defense_stages(nad_official.get_config(None if teacher
                                                             else 'finetuned_teacher'))
  expected.student.checkpoint, expected.data.path = str(student), str(data)
  if teacher:
    expected.teacher.checkpoint = str(their_teacher)
  assert built.to_dict() == expected.to_dict()


@pytest.mark.slow
def test_the_readmes_python_equivalent_runs(tmp_path):
  """README's "Clean your own model" Python block, on a tiny model, folder and schedule."""
  readme = (ROOT / 'README.md').read_text()
  section = readme[readme.index('## Clean your own model'):readme.index('## Results')]
  code = section.split('```python\n')[1].split('```')[0]
  data = write_folder(tmp_path / 'data', train=24)  # 72 images: the teacher's batch is 64
  shrink = {"'preact_resnet18'": "'tiny'", "'DIR'": repr(str(data)),
            "'model.pth'": repr(str(write_tiny_pth(tmp_path / 'model.pth'))),
            "'cleaned.pth'": repr(str(tmp_path / 'cleaned.pth')),
            'target_label=0)': 'target_label=0, epochs=1, teacher_epochs=1, batch_size=8, '
                               'clean_fraction=1.0)'}
  for shown, small in shrink.items():
    assert shown in code, shown
    code = code.replace(shown, small)
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  assert torch.load(tmp_path / 'cleaned.pth', weights_only=True)
