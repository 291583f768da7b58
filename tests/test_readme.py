"""The README's first section stays true: its install lines are CI's, its runs run.

Every `python main.py` command of the section "## The two commands" (its subsections
included) runs here on the install CI makes, with overrides that shrink it to seconds.
A command added to that section without an entry in SHRINK fails this test.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that shrink each README command to a smoke run; the rest of the command is as shown.
TINY_RECIPE = ['--config.model.name=tiny', '--config.backdoor_training.epochs=1',
               '--config.teacher.epochs=1', '--config.nad.epochs=1',
               '--config.backdoor_training.batch_size=32', '--config.teacher.batch_size=32',
               '--config.nad.batch_size=32', '--config.data.eval_batch_size=64']
SHRINK = {
    'configs/quickstart.py': TINY_RECIPE + [
        '--config.data.train_size=512', '--config.data.test_size=128',
        '--config.data.clean_fraction=0.25'],
    # The paper's config on tfds: the offline test builder (tests/tfds_builders.py) in a
    # temporary data_dir stands in for the CIFAR-10 download.
    'configs/nad_cifar.py': TINY_RECIPE + [
        '--config.data.name=nad_test_images', '--config.data.clean_fraction=0.25'],
}


def first_section() -> str:
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  start = readme.index('## The two commands')
  end = readme.find('\n## ', start + 1)
  return readme[start:end if end > 0 else None]


def shell_commands() -> list[str]:
  """The commands of the section's code blocks, each `&&`-joined part on its own."""
  blocks = re.findall(r'```bash\n(.*?)```', first_section(), re.S)
  lines = [line.strip() for block in blocks for line in block.splitlines()]
  return [part.strip() for line in lines if line and not line.startswith('#')
          for part in line.split('&&')]


def main_commands() -> list[list[str]]:
  return [shlex.split(c) for c in shell_commands() if c.startswith('python main.py')]


def test_the_test_command_is_what_ci_runs():
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  ci_installs = [shlex.split(line) for line in ci if line.startswith('pip install')
                 and '--upgrade' not in line]
  readme = shell_commands()
  readme_installs = [shlex.split(c) for c in readme if c.startswith('pip install')]
  assert ci_installs and all([a for a in c if a != '-q'] in readme_installs for c in ci_installs)
  tests = [line for line in ci if line.startswith('python -m pytest')]
  assert len(tests) == 1 and tests[0] in readme


def test_install_lines_name_real_extras_and_the_constraints_file():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    extras = set(tomllib.load(f)['project']['optional-dependencies'])
  installs = [c for c in shell_commands() if c.startswith('pip install')]
  assert len(installs) >= 2
  for command in installs:
    assert '-c constraints.txt' in command, command
    named = re.search(r"\.\[([a-z0-9_,]+)\]", command)
    assert not named or set(named.group(1).split(',')) <= extras, command
  assert os.path.isfile(os.path.join(ROOT, 'constraints.txt'))


def test_every_main_command_has_its_shrunk_form():
  configs = [next(a for a in args if a.startswith('--config=')).split('=', 1)[1]
             for args in main_commands()]
  assert 'configs/quickstart.py' in configs
  assert not set(configs) - set(SHRINK), 'add overrides for the new README command to SHRINK'


@pytest.mark.parametrize('args', main_commands(), ids=lambda a: a[2])
def test_readme_main_command_runs(args, tmp_path):
  config = args[2].split('=', 1)[1]
  if 'nad_cifar' in config:
    pytest.importorskip('tensorflow_datasets',
                        reason="tfds is not installed (pip install 'nad-jax[tfds]')")
  flags = [a if not a.startswith('--workdir=') else f'--workdir={tmp_path / "run"}'
           for a in args[2:]] + SHRINK[config] + [
               '--config.compilation_cache=']  # '': the tests' own cache (conftest.py)
  if 'nad_cifar' in config:  # tfds reads data_dir; the synthetic data refuses it
    flags.append(f'--config.data.data_dir={tmp_path / "tfds"}')
  # main.py as the README runs it, after registering the offline tfds test builders.
  program = ('import runpy, sys; import tests.tfds_builders; '
             "sys.argv = ['main.py'] + sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")
  if 'tfds' in config or 'nad_cifar' in config:
    command = [sys.executable, '-c', program, *flags]
  else:  # no tfds needed: exactly `python main.py ...`
    command = [sys.executable, 'main.py', *flags]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'run' / 'results.json') as f:
    results = json.load(f)
  assert set(results['stages']) == {'backdoored', 'teacher', 'nad'}
