"""The benchmark scripts fail loudly instead of reporting half a result: bench.py when a
worker (the PyTorch reference on a missing device) fails, roofline.py when its stage times
come from another machine."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_bench_fails_when_the_pytorch_worker_fails(monkeypatch, capsys):
  """A worker that exits non-zero ends the command: exit status 1, one line naming the
  device, no result files."""
  monkeypatch.setattr(subprocess, 'run',
                      lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, b'', b''))
  with pytest.raises(SystemExit) as exit_:
    bench.main(['--devices', '', '--torch', 'on', '--torch-device', 'cuda',
                '--out', '/nonexistent/bench'])
  message = str(exit_.value.code)
  assert message.startswith('error: the PyTorch reference (--torch-device cuda) failed')
  assert '\n' not in message


def test_the_pytorch_worker_refuses_a_missing_gpu_in_one_line():
  torch = pytest.importorskip('torch')
  if torch.cuda.is_available():
    pytest.skip('this machine has a CUDA device')
  with pytest.raises(SystemExit) as exit_:
    bench.torch_worker(bench.parse(['--torch-device', 'cuda']))
  assert str(exit_.value.code) == '--torch-device cuda: PyTorch sees no CUDA device on this machine'


def test_roofline_refuses_stage_times_from_another_machine(tmp_path):
  import roofline  # pylint: disable=g-import-not-at-top  (imports JAX)
  here = roofline.this_machine()
  rows = [{'framework': 'pytorch', 'part': 'stage', 'wall_s': 10.0}]
  other = tmp_path / 'other.json'
  other.write_text(json.dumps({'meta': {
      'machine': {'cpu': 'Some Other CPU', 'cores': here['cores']},
      'backend': here['backend'], 'accelerator': here['accelerator']}, 'rows': rows}))
  with pytest.raises(SystemExit) as exit_:
    roofline.stage_rows(str(other))
  message = str(exit_.value.code)
  assert message.startswith(f'error: --stage-json {other} was measured on Some Other CPU')
  assert '\n' not in message
  # one CPU label, other features (AVX-512 against AVX2 only): another machine
  features = tmp_path / 'features.json'
  features.write_text(json.dumps({'meta': {
      'machine': {'cpu': here['cpu'], 'cpu_features': ['avx2', 'other'], 'cores': here['cores']},
      'backend': here['backend'], 'accelerator': here['accelerator']}, 'rows': rows}))
  with pytest.raises(SystemExit) as exit_:
    roofline.stage_rows(str(features))
  assert str(exit_.value.code).startswith(
      f"error: --stage-json {features} was measured on {here['cpu']} (avx2, other)")
  for machine in ({'cpu': here['cpu'], 'cores': here['cores']},  # features not recorded
                  {'cpu': here['cpu'], 'cpu_features': here['cpu_features'],
                   'cores': here['cores']}):
    same = tmp_path / 'same.json'
    meta = {'machine': machine, 'backend': here['backend'], 'accelerator': here['accelerator']}
    same.write_text(json.dumps({'meta': meta, 'rows': rows}))
    assert roofline.stage_rows(str(same)) == (rows, meta)


def test_roofline_names_the_file_its_stored_stage_times_come_from(tmp_path, capsys):
  import roofline  # pylint: disable=g-import-not-at-top  (imports JAX)
  here = roofline.this_machine()
  path = tmp_path / 'stage.json'
  path.write_text(json.dumps({'meta': {
      'machine': {'cpu': here['cpu'], 'cores': here['cores']}, 'date': '2026-01-02 03:04:05',
      'load_before': [1.5, 1.0, 1.0], 'backend': here['backend'],
      'accelerator': here['accelerator']},
      'rows': [{'framework': 'nad-jax', 'part': 'stage', 'wall_s': 100.0}]}))
  roofline.main(['--stage-json', str(path)])
  out = capsys.readouterr().out
  assert (f'stage (d) times stored in {path} (measured 2026-01-02 03:04:05, load average '
          '1.50 before; same CPU model, cores and backend; CPU features not recorded)') in out
  assert ' nad-jax: 100.0 s stored = ' in out and '% of the GEMM rate now)' in out



@pytest.mark.parametrize('rows,message', [
    (None, "not a readable bench.py result (KeyError('rows'))"),
    ([{'part': 'train', 'wall_s': 1.0}], 'no stage row of WRN-16-1 at batch 64, 20 epochs'),
    ([{'part': 'stage', 'framework': 'nad-jax'}], 'no stage row of WRN-16-1'),  # no wall_s
    ([{'part': 'stage', 'model': 'tiny', 'wall_s': 1.0}], 'no stage row of WRN-16-1'),
])
def test_roofline_refuses_a_file_without_the_stage_it_counts(tmp_path, rows, message):
  import roofline  # pylint: disable=g-import-not-at-top  (imports JAX)
  here = roofline.this_machine()
  result = {'meta': {'machine': {'cpu': here['cpu'], 'cores': here['cores']},
                     'backend': here['backend'], 'accelerator': here['accelerator']}}
  if rows is not None:
    result['rows'] = rows
  path = tmp_path / 'result.json'
  path.write_text(json.dumps(result))
  with pytest.raises(SystemExit) as exit_:
    roofline.stage_rows(str(path))
  assert message in str(exit_.value.code) and '\n' not in str(exit_.value.code)


def test_bench_refuses_a_bad_argument_in_one_line(capsys):
  for argv, message in ((['--models', 'nosuch'], "--models 'nosuch': comma-separated names of"),
                        (['--batches', '0'], "--batches '0': comma-separated integers >= 1"),
                        (['--parts', 'nosuch'], "--parts 'nosuch': comma-separated names of"),
                        (['--repeats', '0'], '--repeats 0: must be >= 1'),
                        (['--out', '/dev/null/x'], '--out /dev/null/x: /dev/null is not a folder')):
    with pytest.raises(SystemExit) as exit_:
      bench.parse(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err

@pytest.mark.slow  # a whole bench.py run: `pytest -m "not slow"` skips it
def test_bench_measures_a_training_step(tmp_path):
  """bench.py end to end on the tiny net: its worker builds a stage's optimiser as the engine
  reads it, trains and writes the row; with --torch off its header says PyTorch did not run."""
  out = str(tmp_path / 'bench')
  result = subprocess.run([sys.executable, 'benchmarks/bench.py', '--models', 'tiny',
                           '--batches', '8', '--parts', 'train', '--steps', '1', '--repeats', '1',
                           '--torch', 'off', '--out', out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(f'{out}.json') as f:
    rows = json.load(f)['rows']
  assert [(r['model'], r['part'], r['framework']) for r in rows] == [('tiny', 'train', 'nad-jax')]
  assert rows[0]['img_per_s'] > 0
  with open(f'{out}.md') as f:  # the header names no PyTorch run it did not make
    assert 'PyTorch: not run;' in f.read()


@pytest.mark.slow  # compiles WRN-16-1's forward and NAD step: `pytest -m "not slow"` skips it
def test_roofline_prints_the_bound(capsys):
  """roofline.py without stage times: XLA's FLOP counts, the machine's GEMM rate and the
  stage's shortest time at that rate."""
  import roofline  # pylint: disable=g-import-not-at-top  (imports JAX)
  roofline.main(['--stage-json', ''])
  out = capsys.readouterr().out
  assert 'XLA FLOPs per image: forward 49.4 M' in out
  assert 'float32 GEMM 2048^3 on this machine' in out
  assert 'stage (d) at the GEMM rate' in out
