"""The Python API: the README's example on tiny data (tests/test_pipeline.py checks that it
gives the pipeline's numbers)."""

import jax
import numpy as np
import pytest

import nad_jax
from nad_jax import defaults, models

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

TINY = dict(model='tiny', clean_fraction=0.25)  # erase's; train_backdoored and evaluate
# draw no clean subset and refuse clean_fraction


@pytest.fixture(scope='module')
def data():
  return nad_jax.load_data('synthetic', train_size=512, test_size=256)


@pytest.fixture(scope='module')
def backdoored(data):
  return nad_jax.train_backdoored(data, attack='badnets', epochs=2, batch_size=32,
                                  learning_rate=0.05, lr_boundaries=(), model='tiny')


def test_the_readme_example_on_tiny_data(data, backdoored):
  assert [h['epoch'] for h in backdoored.history] == [0, 1, 2]
  leaves = jax.tree.leaves(backdoored.variables)
  assert leaves and all(isinstance(x, np.ndarray) for x in leaves)  # host arrays
  before = nad_jax.evaluate(data, backdoored.variables, model='tiny')
  assert before == {k: backdoored.history[-1][k] for k in before}
  erased = nad_jax.erase(data, backdoored.variables, method='nad', epochs=1, teacher_epochs=1,
                         **TINY)
  assert len(erased.history[-1]['at']) == 3
  teacher = erased.info['teacher']  # NAD's trained teacher, as results.json's 'teacher'
  assert [h['epoch'] for h in teacher.history] == [0, 1] and not erased.attack
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(teacher.variables))
  assert nad_jax.evaluate(data, erased.variables, model='tiny') == {
      k: erased.history[-1][k] for k in ('acc', 'acc_nontarget', 'asr', 'ra')}


@pytest.mark.parametrize('method', ['ft', 'fp', 'mcr'])
def test_the_baseline_defenses(data, backdoored, method):
  # A config with the defenses' sections, as configs/table1.py has them: the options still
  # reach the defense that runs (FP's epochs once followed NAD's only in a fresh config).
  config = defaults.defense_stages(nad_jax.make_config())
  config.mcr.update(samples_per_epoch=0, points=3)  # MCR: one pass over the subset, 3 points
  result = nad_jax.erase(data, backdoored.variables, method=method, epochs=1, config=config,
                         **TINY)
  assert [h['epoch'] for h in result.history] == [0, 1]
  assert 0 <= result.history[-1]['asr'] <= 100
  if method == 'fp':  # what FP pruned, as results.json's 'fine_pruning'
    assert len(result.info['pruned_channels']) == result.info['pruned'] > 0
  if method == 'mcr':  # the curve and the point chosen on it, as results.json's 'mcr'
    assert result.info['t'] in [point['t'] for point in result.info['curve']]


def test_a_bad_option_names_it(data, backdoored):
  for method in ('ft', 'fp', 'mcr'):  # FT is NAD with every beta 0
    with pytest.raises(nad_jax.ConfigError, match=f"betas: NAD's, not a field of method "
                       f"'{method}'"):
      nad_jax.erase(data, backdoored.variables, method=method, betas=(1.0, 1.0, 1.0), **TINY)
  with pytest.raises(nad_jax.ConfigError, match="nad.epochs '2': must be of type int, not str"):
    nad_jax.erase(data, backdoored.variables, epochs='2', **TINY)
  with pytest.raises(nad_jax.ConfigError, match="option 'betas' does not apply to this call"):
    nad_jax.train_backdoored(data, betas=(1.0, 1.0, 1.0), model='tiny')
  with pytest.raises(nad_jax.ConfigError, match="method 'prune'"):
    nad_jax.erase(data, backdoored.variables, method='prune', **TINY)
  with pytest.raises(nad_jax.ConfigError, match='nad.epochs -1'):
    nad_jax.erase(data, backdoored.variables, epochs=-1, **TINY)
  with pytest.raises(nad_jax.ConfigError, match='attack.target_label 12'):
    nad_jax.evaluate(data, backdoored.variables, target_label=12, model='tiny')
  with pytest.raises(nad_jax.ConfigError, match="unknown option 'epoch'.*'epochs'"):
    nad_jax.erase(data, backdoored.variables, epoch=3, **TINY)
  with pytest.raises(nad_jax.ConfigError, match="unknown option 'trainsize'.*'train_size'"):
    nad_jax.load_data('synthetic', trainsize=10)
  with pytest.raises(nad_jax.ConfigError, match="do not fit model.name 'wrn16_1'"):
    nad_jax.evaluate(data, backdoored.variables)  # tiny variables, the default model
  config = nad_jax.make_config()
  config.seeds = (0, 1)
  with pytest.raises(nad_jax.ConfigError, match=r'seeds \(0, 1\): the Python API trains one'):
    nad_jax.erase(data, backdoored.variables, config=config, **TINY)


def test_refools_selection_is_reported_and_made_once_per_process(data, capsys):
  """Refool's adversarial selection trains a surrogate per round: the API reports its rounds
  and keeps its choice for the next call with the same attack and data, as a workdir does."""
  config = nad_jax.make_config(model='tiny', attack='refool')
  config.attack.update(reflections=4, reflection_candidates=12, selection_rounds=2,
                       selection_holdout=40)
  config.attack.surrogate.update(epochs=1, batch_size=64)
  backdoored = nad_jax.train_backdoored(data, config=config, epochs=1, batch_size=64)
  rounds = backdoored.attack['selection_rounds']
  assert [r['round'] for r in rounds] == [1, 2]
  assert capsys.readouterr().out.count('[refool] selection round') == 2
  metrics = nad_jax.evaluate(data, backdoored.variables, config=config)
  out = capsys.readouterr().out
  assert '[refool] selection round' not in out and 'kept from an earlier call' in out
  assert metrics == {k: backdoored.history[-1][k] for k in metrics}
  config.attack.seed = 1  # another attack: chosen again
  nad_jax.evaluate(data, backdoored.variables, config=config)
  assert capsys.readouterr().out.count('[refool] selection round') == 2


def test_evaluate_needs_no_training_batch_to_fit(backdoored):
  few = nad_jax.load_data('synthetic', train_size=40, test_size=64)  # 2 clean images at 5%
  metrics = nad_jax.evaluate(few, backdoored.variables, model='tiny')
  assert set(metrics) == {'acc', 'acc_nontarget', 'asr', 'ra'}


def test_nad_on_a_backdoorbench_backbone():
  """NAD distils on BackdoorBench's torchvision ResNet-18, whose last group is 1x1 at 32x32:
  the groups it distils have spatial extent, so each AT term is non-zero (a 1x1 map is 1
  after normalisation, and its term 0). tests/test_models.py checks every model's distilled
  groups for that extent. Student and teacher: two random initialisations."""
  name = 'resnet18'
  data = nad_jax.load_data('synthetic', train_size=128, test_size=64)
  model = models.build_model(name, data.num_classes)
  student, teacher = (jax.device_get(models.initialize(model, jax.random.key(seed),
                                                     data.test_images.shape[1:]))
                      for seed in (0, 1))
  erased = nad_jax.erase(data, student, teacher=teacher, epochs=1, batch_size=32,
                         learning_rate=0.01, lr_boundaries=(), model=name, clean_fraction=0.5)
  at = erased.history[-1]['at']
  assert len(at) == 3 and all(np.isfinite(at)) and min(at) > 0, at
