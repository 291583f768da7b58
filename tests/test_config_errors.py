"""Inputs a user can get wrong end `main.py` with one message naming them, exit status 1,
no traceback and nothing written. tests/test_validation.py checks every rule in-process;
this sweep checks each kind of input through the command line."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_tree(root, classes_by_split, corrupt=None):
  """An ImageFolder tree of 8x8 PNGs: {split: {class: count}}; `corrupt`: a file to spoil."""
  rng = np.random.default_rng(0)
  for split, classes in classes_by_split.items():
    for name, count in classes.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / split / name / f'{i}.png')
  if corrupt:
    (root / corrupt).write_bytes(b'not a png')
  return str(root)


def random_bytes(path):
  path.write_bytes(np.random.default_rng(0).bytes(5000))
  return str(path)


def wrn_state_dict(path):
  """A WideResNet-16-1 state_dict: the wrong architecture for the tiny config."""
  pytest.importorskip('torch')
  import jax  # pylint: disable=g-import-not-at-top
  from nad_jax import models, torch_io  # pylint: disable=g-import-not-at-top
  variables = models.build_model('wrn16_1', 10).init(jax.random.key(0), np.zeros((1, 32, 32, 3)),
                                                     train=False)
  torch_io.save(variables, str(path))
  return str(path)


TEN = {str(c): 3 for c in range(10)}
FOLDER = ['--config.data.source=folder', '--config.backdoor_training.batch_size=4',
          '--config.teacher.batch_size=4', '--config.nad.batch_size=4',
          '--config.data.eval_batch_size=4']
# (id, flags made from an inputs folder, what the one message must name)
CASES = [
    ('model.name', lambda d: ['--config.model.name=resnet999'], 'model.name'),
    ('model.conv', lambda d: ['--config.model.conv=cudnn'], 'model.conv'),
    ('onednn on 4 devices', lambda d: ['--config.model.conv=onednn'], 'model.conv'),
    ('mean without std', lambda d: ['--config.model.mean=(0.5,0.5,0.5)'], 'model.std'),
    ('attack.name', lambda d: ['--config.attack.name=nosuchattack'], 'attack.name'),
    ('attack variant by name', lambda d: ['--config.attack.name=sig'], 'configs/<file>.py:sig'),
    ('files without its path', lambda d: ['--config.attack.name=files'], 'attack.path'),
    ('poison_rate', lambda d: ['--config.attack.poison_rate=1.5'], 'attack.poison_rate'),
    ('poisons nothing', lambda d: ['--config.attack.poison_rate=0.0005'], 'attack.poison_rate'),
    ('target_label', lambda d: ['--config.attack.target_label=10'], 'attack.target_label'),
    ('eval_batch_size 0', lambda d: ['--config.data.eval_batch_size=0'], 'data.eval_batch_size'),
    ('folder without path', lambda d: ['--config.data.source=folder'], 'data.path'),
    ('folder missing', lambda d: ['--config.data.source=folder',
                                  '--config.data.path=/nonexistent/cifar'], 'data.path'),
    ('textures', lambda d: ['--config.data.textures_per_class=0'], 'data.textures_per_class'),
    ('betas', lambda d: ['--config.nad.betas=(1.0,2.0)'], 'nad.betas'),
    ('layers', lambda d: ["--config.nad.layers=('group1','group2','block9')"], 'nad.layers'),
    ('eval_every', lambda d: ['--config.nad.eval_every=0'], 'nad.eval_every'),
    ('unknown field', lambda d: ['--config.nad.beta=1'], "'beta'"),
    ('wrong type', lambda d: ['--config.nad.epochs=abc'], '--config.nad.epochs'),
    ('no config file', lambda d: ['--config=configs/nosuch.py'], 'configs/nosuch.py'),
    ('variant refused', lambda d: ['--config=configs/tiny.py:blend'], 'configs/tiny.py'),
    ('ablation variant', lambda d: ['--config=configs/ablations.py:fraction_0.3'],
     'configs/ablations.py'),
    ('table all not alone', lambda d: ['--config=configs/table1.py:all,badnets'],
     "'all' stands alone"),
    ('table attack twice', lambda d: ['--config=configs/table1.py:badnets,blend,badnets'],
     "configs/table1.py names badnets twice in 'badnets,blend,badnets'"),
    ('table override an attack sets', lambda d: [
        '--config=configs/table1.py', '--config.teacher.batch_size=8'],
     '--config.table.attack_configs.blend.teacher.batch_size=8'),
    # Fields a run does not read are refused, not recorded as if used.
    ('recipe of a loaded backdoored model', lambda d: [
        f'--config.student.checkpoint={random_bytes(d / "student.checkpoint")}',
        '--config.backdoor_training.epochs=7'],
     'backdoor_training.epochs 7: the backdoored model is loaded from student.checkpoint'),
    ('recipe of a loaded teacher', lambda d: [
        f'--config.teacher.checkpoint={random_bytes(d / "teacher.checkpoint")}',
        '--config.teacher.learning_rate=0.7'],
     'teacher.learning_rate 0.7: the teacher is loaded from teacher.checkpoint'),
    ('target of an all-to-all backdoor', lambda d: [
        '--config.attack.mode=all_to_all', '--config.attack.target_label=3'],
     'attack.target_label 3: an all-to-all backdoor relabels y as y+1'),
    ('a defense the table does not run', lambda d: [
        '--config=configs/table1.py:badnets', "--config.table.defenses=('none','ft')",
        '--config.mcr.t=0.9'], "mcr.t 0.9: table.defenses ('none', 'ft') has no mcr"),
    ("an attack's own field of a defense the table does not run", lambda d: [
        '--config=configs/table1.py:blend', "--config.table.defenses=('none','ft')",
        '--config.table.attack_configs.blend.teacher.batch_size=8'],
     "table.attack_configs.blend.teacher.batch_size 8: table.defenses ('none', 'ft') has no"),
    ("a field of an attack the table does not run", lambda d: [
        '--config=configs/table1.py:badnets',
        '--config.table.attack_configs.blend.teacher.batch_size=8'],
     "table.attack_configs.blend.teacher.batch_size 8: table.attacks ('badnets',) has no "
     'blend; leave it out'),
    ('a table with the nad runner', lambda d: [
        '--config=configs/table1.py:blend', '--config.runner=nad'],
     "runner 'nad': must be 'table1' where the config has a table section"),
    ('the table runner without a table', lambda d: ['--config.runner=table1'],
     "runner 'table1': must be 'table1' where the config has a table section"),
    ('distillation without nad', lambda d: [
        '--config=configs/table1.py:badnets', "--config.table.defenses=('none','ft')",
        '--config.nad.betas=(1.0,2.0,3.0)'], "nad.betas (1.0, 2.0, 3.0): table.defenses"),
    ('student missing', lambda d: ['--config.student.checkpoint=/nonexistent/model.pth'],
     'student.checkpoint'),
    ('student random bytes', lambda d: [
        f'--config.student.checkpoint={random_bytes(d / "student.checkpoint")}'],
     'student.checkpoint'),
    ('teacher of another model', lambda d: [
        f'--config.teacher.checkpoint={wrn_state_dict(d / "teacher.ckpt")}'],
     'teacher.checkpoint'),
    ('corrupt image', lambda d: FOLDER + [
        f'--config.data.path={image_tree(d / "data", {"train": TEN, "test": TEN}, "train/3/1.png")}'],
     'train/3/1.png'),
    ('empty class folder', lambda d: FOLDER + [
        f'--config.data.path={image_tree(d / "data", {"train": {**TEN, "9": 0}, "test": TEN})}'],
     'holds no image'),
    ('a size the folder does not read', lambda d: FOLDER + [
        f'--config.data.path={image_tree(d / "data", {"train": TEN, "test": TEN})}',
        '--config.data.train_size=100'], 'data.train_size 100: the folder source does not'),
    ('a path the synthetic data does not read', lambda d: [f'--config.data.path={d}'],
     'data.path'),
    ('test classes differ', lambda d: FOLDER + [
        f'--config.data.path={image_tree(d / "data", {"train": TEN, "test": {"0": 3}})}'],
     'test classes differ'),
]


@pytest.mark.parametrize('name,flags,field', CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_with_one_clear_message(tmp_path, name, flags, field):
  del name
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  workdir = tmp_path / 'workdir'
  flags = flags(inputs)
  config = [f for f in flags if f.startswith('--config=')] or ['--config=configs/tiny.py']
  result = subprocess.run(
      [sys.executable, 'main.py', *config, f'--workdir={workdir}',
       *[f for f in flags if not f.startswith('--config=')]],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and field in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()  # nothing written


@pytest.mark.parametrize('config', ['configs/tiny.py', 'configs/table1.py:badnets'])
@pytest.mark.parametrize('where', ['file', 'below a file', 'empty'])
def test_a_workdir_that_cannot_be_a_folder_is_refused(tmp_path, config, where):
  a_file = tmp_path / 'results.json'
  a_file.write_text('{}')
  workdir = {'file': str(a_file), 'below a file': str(a_file / 'run'), 'empty': ''}[where]
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'),
                           f'--config={os.path.join(ROOT, config)}', f'--workdir={workdir}'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1, result.stderr[-2000:]
  message = {'file': f'--workdir {workdir}: a file, not a folder',
             'below a file': f'--workdir {workdir}: {a_file} is a file',
             'empty': "--workdir '': name a folder"}[where]
  assert result.stderr.strip().splitlines()[-1] == f'error: {message}'
  assert 'Traceback' not in result.stderr and a_file.read_text() == '{}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']  # nothing written
