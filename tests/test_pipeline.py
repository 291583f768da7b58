"""The whole pipeline on the tiny config: end to end, restore, resume, data parallel."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from configs import tiny
import nad_jax
from nad_jax import attacks, data, models, stages, train
from nad_jax.experiments import nad as nad_runner

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny'))
  return workdir, nad_runner.run(tiny_config(), workdir).results


def test_end_to_end_writes_results(finished_run):
  workdir, results = finished_run
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved['stages'] == results['stages']
  assert set(saved['stages']) == {'backdoored', 'teacher', 'nad'}
  for stage, metrics in saved['stages'].items():
    assert set(metrics) == {'acc', 'acc_nontarget', 'asr', 'ra'}
    assert all(0 <= v <= 100 for v in metrics.values())
    assert [h['epoch'] for h in saved['history'][stage]] == [0, 1, 2]
  assert len(saved['history']['nad'][-1]['at']) == 3
  # The teacher and NAD start from the backdoored model: its last evaluation is their epoch 0.
  for stage in ('teacher', 'nad'):
    assert saved['history'][stage][0] == {'epoch': 0, **saved['stages']['backdoored']}
  assert saved['config']['model']['name'] == 'tiny'
  for stage in nad_runner.STAGES:
    assert sorted(os.listdir(os.path.join(workdir, stage)), key=str)[:2] == ['1', '2']


def test_rerun_skips_finished_stages(finished_run):
  workdir, results = finished_run
  # Fields that shape no stage may change; the figures are still the first run's, and each
  # stage names the values it ran with where the recorded (this run's) config differs.
  again = nad_runner.run(tiny_config(**{'nad.eval_every': 2, 'model.conv': 'xla'}),
                         workdir).results
  assert (again['config']['model']['conv'], again['config']['nad']['eval_every']) == ('xla', 2)
  assert again['stages'] == results['stages']
  first = results['config']
  ran = lambda name: {'model.conv': first['model']['conv'],
                      **({'nad.eval_every': first['nad']['eval_every']} if name == 'nad' else {})}
  # Nothing trained; the first run's timing is kept, and said to be.
  assert again['timing'] == {name: {**t, 'from_earlier_run': True, 'trained_with': ran(name)}
                             for name, t in results['timing'].items()}


def test_the_python_api_gives_the_pipelines_numbers(finished_run, monkeypatch):
  _, results = finished_run
  config = tiny_config()
  data_set = nad_jax.load_data('synthetic', train_size=512, test_size=256)
  backdoored = nad_jax.train_backdoored(data_set, config=config)
  assert backdoored.history == results['history']['backdoored']
  evaluated = []
  evaluate = stages.evaluate
  monkeypatch.setattr(stages, 'evaluate', lambda *a: evaluated.append(1) or evaluate(*a))
  erased = nad_jax.erase(data_set, backdoored.variables, config=config)
  assert erased.history == results['history']['nad']
  # The given model once, then the teacher's and NAD's two epochs each: nothing twice.
  assert len(evaluated) == 1 + 2 + 2


def test_eval_only_reproduces_saved_figures(finished_run):
  workdir, results = finished_run
  config = tiny_config()
  config.eval_only = True
  evaluated = nad_runner.evaluate_only(config, workdir)
  assert evaluated['stages'] == results['stages']


@pytest.mark.parametrize('field, value', [('attack.target_label', 3), ('nad.epochs', 7),
                                          ('seeds', (1, 0))])
def test_eval_only_refuses_a_config_the_workdir_was_not_trained_with(finished_run, field,
                                                                     value):
  """Evaluating the saved models under another attack, schedule or seed order would
  report figures of models that config did not train; nothing is written then."""
  workdir, _ = finished_run
  eval_file = os.path.join(workdir, 'eval.json')
  written = os.stat(eval_file).st_mtime_ns if os.path.exists(eval_file) else None
  config = tiny_config()
  config.eval_only = True
  section, name = field.split('.') if '.' in field else (None, field)
  (config[section] if section else config)[name] = value
  with pytest.raises(stages.ConfigError, match='was trained with other values') as error:
    nad_runner.evaluate_only(config, workdir)
  assert 'Evaluate it with the values it was trained with' in str(error.value)
  assert 'train it again' not in str(error.value)  # evaluating trains nothing
  assert (os.stat(eval_file).st_mtime_ns if os.path.exists(eval_file) else None) == written


def test_eval_only_refuses_an_unfinished_stage(finished_run, tmp_path):
  """An interrupted stage's latest epoch is not its result."""
  workdir, _ = finished_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval.json'))
  shutil.rmtree(copy / 'teacher' / '2')
  config = tiny_config()
  config.eval_only = True
  with pytest.raises(stages.ConfigError, match=r"stage 'teacher' in .* is unfinished \(epoch 1 "
                     r"of 2 saved\); rerun without --config.eval_only"):
    nad_runner.evaluate_only(config, str(copy))
  assert not os.path.exists(copy / 'eval.json')


def test_a_rerun_that_trains_again_removes_the_stale_eval_json(finished_run, tmp_path):
  """eval.json describes the models it evaluated: a rerun that trains nothing keeps it, one
  that trains a stage again (its folder deleted) removes it."""
  workdir, _ = finished_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  config = tiny_config()
  config.eval_only = True
  nad_runner.evaluate_only(config, copy)
  eval_file = os.path.join(copy, 'eval.json')
  nad_runner.run(tiny_config(), copy)
  assert os.path.exists(eval_file)
  shutil.rmtree(os.path.join(copy, 'nad'))
  nad_runner.run(tiny_config(), copy)
  assert not os.path.exists(eval_file)


def test_student_checkpoint_path_is_loaded_not_retrained(finished_run, tmp_path):
  workdir, results = finished_run
  config = tiny_config(**{'student.checkpoint': os.path.join(workdir, 'backdoored')})
  config.teacher.epochs = 0
  config.nad.epochs = 0
  loaded = nad_runner.run(config, str(tmp_path)).results
  assert loaded['stages']['backdoored'] == results['stages']['backdoored']
  assert not os.path.exists(tmp_path / 'backdoored')
  # Stages of 0 epochs keep their start, so an evaluation-only rerun finds every model.
  config.eval_only = True
  assert nad_runner.evaluate_only(config, str(tmp_path))['stages'] == loaded['stages']


def test_eval_every_evaluates_and_saves_less_and_trains_the_same(finished_run, tmp_path):
  workdir, results = finished_run
  every_epoch = results['history']['nad']
  sparse = nad_runner.run(tiny_config(**{'nad.eval_every': 2, 'backdoor_training.eval_every': 2}),
                        str(tmp_path)).results
  history = sparse['history']['nad']
  assert [h['epoch'] for h in history] == [0, 1, 2]
  assert ['acc' in h for h in history] == [True, False, True]
  assert history[1]['ce'] == every_epoch[1]['ce']  # evaluation does not touch training
  assert sparse['stages'] == results['stages']
  assert sorted(os.listdir(tmp_path / 'nad'), key=str)[:1] == ['2']


def run_main(workdir, *flags):
  return subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}', *flags],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_stage_then_resume_gives_same_results(finished_run, tmp_path):
  _, uninterrupted = finished_run
  workdir = str(tmp_path / 'run')
  # '': the tests' compilation cache (conftest.py), which the killed run and the resumed one
  # load their steps from: the same numbers from them as from this process's compiles.
  cache = '--config.compilation_cache='
  process = run_main(workdir, cache)
  first_epoch = os.path.join(workdir, 'teacher', '1')
  deadline = time.time() + 240
  while not os.path.isdir(first_epoch) and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.communicate()  # reaps it and closes its pipes
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  resumed = run_main(workdir, cache)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  restored = re.search(r'\[teacher\] (?:resumed from|restored, finished at) epoch (\d+)', out)
  assert restored, out[-2000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['stages'] == uninterrupted['stages']
  assert results['history'] == uninterrupted['history']
  # The killed run's epoch speeds are gone but for a stage it finished (its folder keeps
  # them): the record says which epochs its speeds cover.
  done = int(restored.group(1))
  teacher = results['timing']['teacher']
  if done < 2:
    assert len(teacher['img_per_s']) == 2 - done and teacher['resumed_after_epoch'] == done
  else:
    assert len(teacher['img_per_s']) == 2 and teacher['from_earlier_run']


def test_one_and_four_devices_agree():
  assert jax.device_count() == 4
  ds = data.synthetic(0, 64, 8)
  model = models.build_model('tiny', 10)
  attack = attacks.build_attack(tiny.get_config().attack, 10, (32, 32, 3))
  poisoned = np.arange(64) % 4 == 0
  params = {}
  for devices in (1, 4):
    mesh = train.make_mesh(devices)
    tx = optax.sgd(0.05, momentum=0.9)
    state = train.replicate(train.init_state(model, tx, jax.random.key(0), (32, 32, 3)), mesh)
    recipe = train.Recipe(batch_size=16, crop_flip=True, cutout=3)
    epoch = train.TrainEpoch(model, tx, mesh, recipe, train.normalizer(None, None), attack)
    arrays = train.replicate((ds.train_images, ds.train_labels, poisoned), mesh)
    state, _ = epoch(state, {}, *arrays, jax.random.key(1))
    params[devices] = jax.device_get(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               params[1], params[4])


def scan_and_step_epochs(compile_first, scans=(True, False)):
  """One epoch of the tiny net, scanned (the GPU/TPU default) and/or step by step (CPU's)."""
  ds = data.synthetic(0, 64, 8)
  model = models.build_model('tiny', 10)
  attack = attacks.build_attack(tiny.get_config().attack, 10, (32, 32, 3))
  mesh = train.make_mesh(1)
  tx = optax.sgd(0.05, momentum=0.9)
  recipe = train.Recipe(batch_size=16, crop_flip=True, cutout=3)
  arrays = (ds.train_images, ds.train_labels, np.arange(64) % 4 == 0)
  out = {}
  for scan in scans:
    state = train.init_state(model, tx, jax.random.key(0), (32, 32, 3))
    epoch = train.TrainEpoch(model, tx, mesh, recipe, train.normalizer(None, None), attack, scan)
    if compile_first:
      epoch.compile(state, {}, *arrays)
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      out[scan] = jax.device_get(epoch(state, {}, *arrays, jax.random.key(1)))
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
    out[scan, 'compiles'] = [e for e in compiles if e.startswith('/jax/core/compile/')]
  return out


def test_scanned_epoch_matches_step_by_step_and_compile_leaves_nothing_to_compile():
  out = scan_and_step_epochs(compile_first=True)
  (scanned, scan_metrics), (stepped, step_metrics) = out[True], out[False]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               scanned.params, stepped.params)
  np.testing.assert_allclose(scan_metrics['ce'], step_metrics['ce'], rtol=1e-5)
  # The scanned epoch is one dispatch: after compile() its first call compiles nothing.
  assert out[True, 'compiles'] == []
  # The check can fail: without compile() the first call compiles.
  assert scan_and_step_epochs(compile_first=False, scans=(True,))[True, 'compiles']


def test_same_seed_same_synthetic_data_and_subset():
  a, b = data.synthetic(3, 100, 10), data.synthetic(3, 100, 10)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(data.clean_subset(1000, 0.05, 3), data.clean_subset(1000, 0.05, 3))
  assert not np.array_equal(a.train_images, data.synthetic(4, 100, 10).train_images)


def test_a_diverging_attention_term_names_nad_betas(tmp_path):
  # |F|^p overflows float32 for p = 200, so the AT term is NaN from the first step.
  config = tiny_config(**{'nad.p': 200.0, 'backdoor_training.epochs': 1, 'teacher.epochs': 1,
                          'nad.epochs': 1})
  with pytest.raises(FloatingPointError, match=r'nad: the loss became non-finite.*lower nad.betas'):
    nad_runner.run(config, str(tmp_path)).results


def test_results_json_refuses_nan(tmp_path):
  with pytest.raises(ValueError, match='not JSON compliant'):
    stages.write_json(str(tmp_path / 'results.json'), {'asr': float('nan')})
  assert not os.listdir(tmp_path)
