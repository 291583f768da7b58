"""Bad config values end with one clear message naming the field, and no traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ('--config.model.name=resnet999', 'model.name'),
    ('--config.model.conv=cudnn', 'model.conv'),
    ('--config.model.conv=onednn', 'model.conv'),  # the tests' 4 forced devices
    ('--config.attack.name=nosuchattack', 'attack.name'),
    ('--config.attack.poison_rate=1.5', 'attack.poison_rate'),
    ('--config.attack.target_label=10', 'attack.target_label'),
    ('--config.data.source=folder', 'data.path'),
    ('--config.data.path=/nonexistent/cifar', 'data.path'),
    ('--config.data.textures_per_class=0', 'data.textures_per_class'),
    ('--config.nad.betas=(1.0,2.0)', 'nad.betas'),
    ("--config.nad.layers=('group1','group2','block9')", 'nad.layers'),
    ('--config.nad.eval_every=0', 'nad.eval_every'),
    ('--config.student.checkpoint=/nonexistent/model.pth', 'student.checkpoint'),
]


@pytest.mark.parametrize('flag,field', CASES)
def test_bad_value_exits_with_one_clear_message(tmp_path, flag, field):
  flags = [flag]
  if field == 'data.path' and flag.startswith('--config.data.path'):
    flags.append('--config.data.source=folder')
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert field in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)  # nothing written
