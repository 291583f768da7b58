"""K seeds side by side (`config.seeds`): replica s is the single run with seed s."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from nad_jax import data, stages, validation
from nad_jax.experiments import nad as nad_runner


def tiny_config(**fields):
  config = tiny.get_config()
  config.backdoor_training.crop_flip = True  # the augmentation draws are per replica too
  config.update_from_flattened_dict(fields)
  return config


def contexts(**fields):
  """(a context over seeds (0, 3), a context of the single run with seed 3)."""
  stacked, single = tiny_config(seeds=(0, 3), **fields), tiny_config(seed=3, **fields)
  dataset = data.load_dataset(stacked.data)
  trained = ('backdoor_training',)
  return (stages.make_context(stacked, dataset, None, trained),
          stages.make_context(single, dataset, None, trained))


def replica(tree, index):
  return jax.tree.map(lambda x: np.asarray(x)[index], tree)


def test_a_replica_draws_what_the_single_run_of_its_seed_draws():
  stacked, single = contexts()
  assert stacked.poisoned.shape == (2, *single.poisoned.shape)
  np.testing.assert_array_equal(stacked.poisoned[1], single.poisoned)
  assert not np.array_equal(stacked.poisoned[0], stacked.poisoned[1])
  for ours, theirs in zip(stages.clean_data(stacked), stages.clean_data(single)):
    np.testing.assert_array_equal(ours[1], theirs)
  jax.tree.map(np.testing.assert_array_equal,
               replica(stages.init_variables(stacked, 'victim_init'), 1),
               jax.device_get(stages.init_variables(single, 'victim_init')))


@pytest.mark.slow  # trains: `pytest -m "not slow"` skips it
@pytest.mark.parametrize('scan', [False, True])  # the CPU's loops, the accelerators' programs
def test_a_replica_trains_as_the_single_run_of_its_seed(scan):
  # One epoch of one step: the same batch, augmentation, trigger and update.
  stacked, single = contexts(**{'data.train_size': 64, 'backdoor_training.epochs': 1,
                                'backdoor_training.batch_size': 64, 'scan_epoch': scan})
  ours, theirs = stages.backdoored(stacked), stages.backdoored(single)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, replica(ours.variables, 1), jax.device_get(theirs.variables))
  assert ours.history[1]['ce'][1] == pytest.approx(theirs.history[1]['ce'], rel=1e-5)
  for metric in stages.METRICS:
    assert ours.history[0][metric][1] == theirs.history[0][metric]  # the same initialisation

  if scan:
    return  # the teacher below trains alike whichever loop runs its epochs
  # The teacher trains on each replica's own clean subset (stacked data): two epochs of
  # one step, the learning rate dropping after the first as the schedule says.
  teacher = tiny_config().teacher.to_dict()
  teacher.update(epochs=2, batch_size=16, lr_boundaries=(1,))
  cfg = ml_collections.ConfigDict(teacher)
  train = lambda ctx, start: stages.train_stage(
      ctx, 'teacher', cfg, stages.recipe_for(cfg), start, *stages.clean_data(ctx), None)
  ours_t, theirs_t = train(stacked, ours.variables), train(single, theirs.variables)
  jax.tree.map(close, replica(ours_t.variables, 1), jax.device_get(theirs_t.variables))
  assert ours_t.timing['img_per_s'][0] > 0


@pytest.mark.slow  # trains: `pytest -m "not slow"` skips it
def test_seeds_run_reports_each_seed_and_resumes(tmp_path):
  workdir = str(tmp_path)
  results = nad_runner.run(tiny_config(seeds=(0, 1)), workdir).results
  assert results['seeds'] == [0, 1]
  for stage, metrics in results['stages'].items():
    per_seed = [results['per_seed'][s][stage] for s in ('0', '1')]
    for metric, value in metrics.items():
      values = [m[metric] for m in per_seed]
      assert value == pytest.approx(np.mean(values), abs=1e-4)
      assert results['std'][stage][metric] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['per_seed'] == results['per_seed']

  # The NAD stage's checkpoint holds both replicas: drop its last epoch and resume.
  shutil.rmtree(os.path.join(workdir, 'nad', '2'))
  resumed = nad_runner.run(tiny_config(seeds=(0, 1)), workdir).results
  assert resumed['per_seed'] == results['per_seed']
  assert resumed['history'] == results['history']

  evaluated = nad_runner.evaluate_only(tiny_config(seeds=(0, 1), eval_only=True), workdir)
  assert evaluated['per_seed'] == results['per_seed']


@pytest.mark.slow  # trains: `pytest -m "not slow"` skips it
def test_a_workdir_of_one_seed_is_not_resumed_as_several(tmp_path):
  workdir = str(tmp_path)
  one_epoch = {'backdoor_training.epochs': 1, 'teacher.epochs': 1, 'nad.epochs': 1}
  single = tiny_config(**one_epoch)
  stages.backdoored(stages.make_context(single, data.load_dataset(single.data), workdir,
                                        ('backdoor_training',)))
  with pytest.raises(validation.ConfigError, match=r'seeds \[\] -> \[0, 1\]'):
    nad_runner.run(tiny_config(seeds=(0, 1), **one_epoch), workdir)


@pytest.mark.parametrize('fields, message', [
    ({'seeds': (1, 1)}, 'seeds (1, 1): must be a tuple of distinct integers'),
    ({'seeds': (0, -1)}, 'seeds (0, -1): must be a tuple of distinct integers'),
    ({'seeds': (0, 1), 'seed': 4}, 'seed 4: must be 0 (its default) when seeds is set'),
])
def test_bad_seeds_are_refused(fields, message):
  with pytest.raises(validation.ConfigError) as error:
    stages.validate(tiny_config(**fields))
  assert str(error.value).startswith(message)


def test_replicas_that_do_not_fit_are_refused_before_training(monkeypatch):
  stacked, _ = contexts()
  monkeypatch.setattr(stages, 'device_memory_free', lambda: 1024)
  with pytest.raises(validation.ConfigError,
                     match=r"seeds: 2 replicas of stage 'backdoored' need .* GiB on a device"):
    stages.backdoored(stacked)
