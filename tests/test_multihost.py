"""Several JAX processes as one run, on this machine: 2 processes of 2 CPU devices each,
joined through a localhost coordinator (CPU collectives: gloo, JAX's default), against one
process with the tests' 4 forced devices.

The two give the same computation, not the same bits: a cross-device sum (gradients,
BatchNorm statistics) adds in another order through gloo than inside one process, 1e-7
apart after a step, and the tiny net at chance accuracy amplifies that as it amplifies the
difference between 1 and 4 devices in one process (30% of a weight after 8 steps). So the
tests compare one epoch of training (to float tolerance), the evaluation of the same
variables (exactly: the initial model, and the 2-process run's checkpoints evaluated in one
process) and, exactly, a 2-process run with one killed and resumed against an
uninterrupted one.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny
from nad_jax import attacks, data, distributed, models, train
from nad_jax.experiments import nad as nad_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 10  # seconds: a killed process ends the other this long after it stops
RUN_TIMEOUT = 400  # seconds for one run of configs/tiny.py (a hang fails, never blocks)
# The runs skip the teacher's training, which runs as the backdoored stage's does: one program
# fewer for each process to compile and set up its collectives for.
OVERRIDES = {'teacher.epochs': 0}


def run_config() -> ml_collections.ConfigDict:
  """configs/tiny.py with OVERRIDES: the config of the two-process runs."""
  config = tiny.get_config()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(devices: int) -> dict:
  """This environment with `devices` forced CPU devices instead of the tests' 4."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  return env


def distributed_flags(port: int, process: int) -> list[str]:
  return ['--config.distributed.enabled=True',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}',
          '--config.distributed.num_processes=2', f'--config.distributed.process_id={process}',
          f'--config.distributed.heartbeat_timeout={HEARTBEAT}']


def start_main(workdir: str, cache: str, port: int) -> list[subprocess.Popen]:
  """run_config() as processes 0 and 1; their output goes to WORKDIR.p<i>.{out,err}."""
  processes = []
  for i in range(2):
    command = [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.compilation_cache={cache}', *distributed_flags(port, i),
               *(f'--config.{field}={value}' for field, value in OVERRIDES.items())]
    with open(f'{workdir}.p{i}.out', 'w') as out, open(f'{workdir}.p{i}.err', 'w') as err:
      processes.append(subprocess.Popen(command, cwd=ROOT, env=environment(2), stdout=out,
                                        stderr=err))
  return processes


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
  """The exit codes; every process still running after `timeout` seconds is killed."""
  deadline = time.time() + timeout
  codes = []
  for process in processes:
    try:
      codes.append(process.wait(timeout=max(deadline - time.time(), 0.1)))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
        p.wait()
      pytest.fail(f'a process was still running after {timeout} s (killed)')
  return codes


def output(workdir: str, process: int, stream: str = 'out') -> str:
  with open(f'{workdir}.p{process}.{stream}') as f:
    return f.read()


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def run_two_processes(workdir: str, cache: str) -> dict:
  codes = wait_all(start_main(workdir, cache, free_port()), RUN_TIMEOUT)
  assert codes == [0, 0], output(workdir, codes.index(max(codes)), 'err')[-3000:]
  return read_results(workdir)


# ------------------------------------------------------------------------- configuration

def section(**fields) -> ml_collections.ConfigDict:
  config = tiny.get_config().distributed
  config.update(fields)
  return config


def test_unset_fields_are_left_to_jax_and_a_disabled_run_joins_nothing():
  arguments = distributed.initialize_arguments(section(enabled=True))
  assert arguments['coordinator_address'] is None  # '' = detected (Cloud TPU, SLURM, MPI)
  assert arguments['num_processes'] is None and arguments['process_id'] is None
  given = distributed.initialize_arguments(section(
      enabled=True, coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1,
      local_device_ids=(0, 1), heartbeat_timeout=7))
  assert given == dict(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1,
                       local_device_ids=[0, 1], initialization_timeout=300,
                       heartbeat_timeout_seconds=7)
  assert distributed.initialize(section()) is False and not jax.distributed.is_initialized()


def test_reachable_waits_for_the_port_and_gives_up(tmp_path):
  with socket.socket() as listening:
    listening.bind(('127.0.0.1', 0))
    listening.listen()
    assert distributed.reachable(f'127.0.0.1:{listening.getsockname()[1]}', 1)
  start = time.monotonic()
  assert not distributed.reachable(f'127.0.0.1:{free_port()}', 1)
  assert time.monotonic() - start < 5


# ------------------------------------------------------------------ one epoch of training

EPOCH_SCRIPT = '''
import sys
import jax
port, process, out = sys.argv[1:]
jax.distributed.initialize(f'127.0.0.1:{port}', 2, int(process), heartbeat_timeout_seconds=10)
import numpy as np
from tests import test_multihost
params = test_multihost.one_epoch()
if jax.process_index() == 0:
  np.savez(out, *jax.tree.leaves(params))
'''


def initial_variables(model) -> dict:
  """Variables drawn with numpy (XLA takes 15 s to compile the tiny net's init on CPU)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)),
                                               train=False))
  rng = np.random.default_rng(0)
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name or "'var'" in name:
      return np.ones(leaf.shape, leaf.dtype)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def one_epoch():
  """One epoch (4 steps) of the tiny net on every device of every process; host params."""
  ds = data.synthetic(0, 64, 8)
  model = models.build_model('tiny', 10)
  attack = attacks.build_attack(tiny.get_config().attack, 10, (32, 32, 3))
  mesh = train.make_mesh()
  tx = optax.sgd(0.05, momentum=0.9)
  state = train.replicate(train.state_from_variables(initial_variables(model), tx), mesh)
  recipe = train.Recipe(batch_size=16, crop_flip=False, cutout=0)
  epoch = train.TrainEpoch(model, tx, mesh, recipe, train.normalizer(None, None), attack)
  arrays = train.replicate((ds.train_images, ds.train_labels, np.arange(64) % 4 == 0), mesh)
  state, _ = epoch(state, {}, *arrays, jax.random.key(1))
  return jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_train_an_epoch_as_one_process_with_four_devices(tmp_path):
  port, out = free_port(), str(tmp_path / 'params.npz')
  processes = [subprocess.Popen([sys.executable, '-c', EPOCH_SCRIPT, str(port), str(i), out],
                                cwd=ROOT, env=environment(2), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=180)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert [p.returncode for p in processes] == [0, 0], logs
  assert jax.device_count() == 4
  with np.load(out) as saved:
    two_processes = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  for a, b in zip(jax.tree.leaves(one_epoch()), two_processes):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------------- the whole pipeline

@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """run_config() as 2 processes, uninterrupted: (workdir, results, compilation cache)."""
  folder = tmp_path_factory.mktemp('multihost')
  workdir, cache = str(folder / 'run'), str(folder / 'xla_cache')
  return workdir, run_two_processes(workdir, cache), cache


@pytest.mark.slow
def test_an_unreachable_coordinator_is_one_line(tmp_path):
  command = [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={tmp_path}',
             *distributed_flags(free_port(), 1), '--config.distributed.initialization_timeout=1']
  result = subprocess.run(command, cwd=ROOT, env=environment(2), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: distributed: process 1 found no coordinator at distributed.coordinator_address')
  assert 'Traceback' not in result.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
def test_two_processes_give_one_process_figures(two_process_run, tmp_path):
  workdir, results, _ = two_process_run
  assert set(results['stages']) == {'backdoored', 'teacher', 'nad'}
  assert {stage: [h['epoch'] for h in history] for stage, history in results['history'].items()
          } == {'backdoored': [0, 1, 2], 'teacher': [0], 'nad': [0, 1, 2]}
  # Process 0 alone prints and writes; both save the checkpoints (orbax's barriers).
  assert 'nad  ' in output(workdir, 0) and 'nad  ' not in output(workdir, 1)
  assert 'epoch' not in output(workdir, 1)
  # The same initial model, evaluated the same: one process, 4 devices, nothing trained.
  config = run_config()
  for stage in ('backdoor_training', 'nad'):
    config[stage].epochs = 0
  untrained = nad_runner.run(config, str(tmp_path / 'untrained')).results
  assert untrained['history']['backdoored'][0] == results['history']['backdoored'][0]
  # The 2-process run's checkpoints, evaluated by one process: its figures, exactly.
  assert nad_runner.evaluate_only(run_config(), workdir)['stages'] == results['stages']


@pytest.mark.slow
def test_a_killed_process_ends_the_other_and_both_resume(two_process_run, tmp_path):
  _, uninterrupted, cache = two_process_run
  workdir = str(tmp_path / 'run')
  processes = start_main(workdir, cache, free_port())
  first_epoch = os.path.join(workdir, 'backdoored', '1', 'commit_success.txt')
  deadline = time.time() + RUN_TIMEOUT
  while not os.path.exists(first_epoch) and time.time() < deadline \
      and all(p.poll() is None for p in processes):
    time.sleep(0.05)
  ended = [i for i, p in enumerate(processes) if p.poll() is not None]
  assert not ended, (f'process {ended[0]} ended (exit {processes[ended[0]].poll()}) before one '
                     'could be killed: ' + output(workdir, ended[0], 'err')[-3000:])
  processes[1].send_signal(signal.SIGKILL)
  # Process 0 waits at a collective or an orbax barrier until the heartbeat times out.
  survivor = wait_all(processes, HEARTBEAT + 60)[0]
  assert survivor != 0
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  resumed = run_two_processes(workdir, cache)
  assert '[backdoored] resumed from epoch 1' in output(workdir, 0)
  assert resumed['stages'] == uninterrupted['stages']
  assert resumed['history'] == uninterrupted['history']
