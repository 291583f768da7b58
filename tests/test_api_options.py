"""The Python API's options, without training: what make_config and load_data accept, and
the one ConfigError, naming the field, that each wrong option gets."""

import os
import re

import jax
import ml_collections
import pytest

import nad_jax
from nad_jax import defaults, models, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_config_keeps_the_given_configs_references():
  # configs/table1.py's FP follows NAD's schedule by reference; a copy must keep that.
  given = defaults.defense_stages(nad_jax.make_config())
  config = nad_jax.make_config(given, nad={'epochs': 3})
  assert (config.nad.epochs, config.fp.epochs, config.fp.eval_every) == (3, 3, 1)
  assert (given.nad.epochs, given.fp.epochs) == (20, 20)  # copied, not changed
  config.fp.epochs = 5  # one way: FP's own field leaves NAD alone
  assert (config.nad.epochs, config.fp.epochs) == (3, 5)


@pytest.mark.parametrize('options,message', [
    (dict(nad={'epochs': '3'}), "nad.epochs '3': must be of type int, not str"),
    (dict(backdoor_training={'learning_rate': '0.1'}),
     "backdoor_training.learning_rate '0.1': must be of type float, not str"),
    (dict(nad={'betas': 1.0}), 'nad.betas 1.0: must be of type tuple, not float'),
    (dict(seed='0'), "seed '0': must be of type int, not str"),
    (dict(target_label=5.5), 'attack.target_label 5.5: must be of type int, not float'),
    (dict(nad=3), r"nad 3: must be a dict of its fields, e\.g\. nad=\{'epochs': 5\}"),
    (dict(config={'seed': 1}),
     r'config: must be a ConfigDict shaped like defaults\.paper_config\(\), not a dict'),
    (dict(betas=(1.0, 1.0, 1.0)), "option 'betas' does not apply to this call"),
    (dict(epoch=3), "unknown option 'epoch'; did you mean 'epochs'"),
    (dict(nad={'epoch': 3}), "unknown option nad.epoch; did you mean 'epochs'"),
    (dict(seeds=(0, 1)), "option 'seeds': a field of the config, not a keyword; set "
                         'config.seeds in the ConfigDict given as config='),
])
def test_a_wrong_option_names_its_field(options, message):
  with pytest.raises(nad_jax.ConfigError, match=message):
    nad_jax.make_config(**options)


def test_a_frozen_config_is_taken_as_a_copy():
  frozen = ml_collections.FrozenConfigDict(defaults.paper_config())
  assert nad_jax.make_config(frozen, nad={'epochs': 3}).nad.epochs == 3
  assert frozen.nad.epochs == 20


def test_a_stage_section_is_an_option():
  config = nad_jax.make_config(teacher={'epochs': 2}, fp={'epochs': 4},
                               config=defaults.defense_stages(defaults.paper_config()))
  assert (config.teacher.epochs, config.fp.epochs) == (2, 4)
  assert isinstance(config, ml_collections.ConfigDict)


@pytest.mark.parametrize('fields,message', [
    (dict(train_size=-5, test_size=10), 'data.train_size -5: must be an integer >= 1'),
    (dict(train_size=0, test_size=10), 'data.train_size 0: must be an integer >= 1'),
    (dict(train_size=10, test_size=10, num_classes=1),
     'data.num_classes 1: must be an integer >= 2'),
    (dict(train_size='10'), "data.train_size '10': must be of type int, not str"),
    (dict(trainsize=10), "unknown option 'trainsize' of load_data; did you mean 'train_size'"),
])
def test_load_data_checks_the_data_fields(fields, message):
  with pytest.raises(nad_jax.ConfigError, match=message):
    nad_jax.load_data('synthetic', **fields)


@pytest.mark.parametrize('source,field,value', [
    ('folder', 'train_size', 100), ('folder', 'seed', 1), ('synthetic', 'path', '.'),
    ('synthetic', 'name', 'mnist')])
def test_load_data_refuses_a_field_its_source_does_not_read(tmp_path, source, field, value):
  where = dict(path=str(tmp_path)) if source == 'folder' else {}
  with pytest.raises(nad_jax.ConfigError, match=f'data.{field} {value!r}: the {source} source '
                     'does not read it'):
    nad_jax.load_data(source, **{**where, field: value})


@pytest.mark.parametrize('field,value,where', [('clean_fraction', 0.1, 'erase, clean_fraction='),
                                              ('eval_batch_size', 64, 'config.data.eval_batch')])
def test_load_data_refuses_a_field_no_dataset_depends_on(field, value, where):
  """The whole dataset is loaded either way; the field is read where it is named."""
  with pytest.raises(nad_jax.ConfigError, match=f'data.{field} {value!r}: load_data does not '
                     f'read it; .*{where}'):
    nad_jax.load_data('synthetic', **{field: value})


@pytest.mark.parametrize('function', ['erase', 'evaluate'])
def test_a_poison_rate_is_refused_where_nothing_is_poisoned(function):
  call = getattr(nad_jax, function)
  with pytest.raises(nad_jax.ConfigError, match=f"poison_rate 0.2: {function}( with method "
                     r"'nad')? does not read it \(the model is given: nothing is poisoned\); "
                     'train_backdoored does'):
    call(None, {}, poison_rate=0.2)


def fp_set(**fields):
  """A config whose FP sets `fields` itself instead of following NAD's."""
  config = defaults.defense_stages(nad_jax.make_config())
  config.fp.update(fields)
  return config


@pytest.mark.parametrize('function,options,message', [
    ('erase', dict(method='ft', nad={'betas': (0.0, 0.0, 5.0)}),
     r"nad.betas \(0.0, 0.0, 5.0\): erase with method 'ft' does not read it; erase with "
     "method 'nad' does"),
    ('erase', dict(method='mcr', nad={'layers': ('block1',)}),
     "nad.layers .*: erase with method 'mcr' does not read it"),
    ('erase', dict(method='fp', nad={'momentum': 0.5}),
     "nad.momentum 0.5: erase with method 'fp' does not read it; erase with method 'nad', "
     "'ft' or 'mcr' does"),
    ('erase', dict(method='fp', fp={'epochs': 3}, nad={'epochs': 5}),
     r"nad.epochs 5: erase with method 'fp' does not read it \(fp.epochs has its own value, "
     r"so FP does not follow NAD's\); erase with method 'nad', 'ft' or 'mcr' does"),
    ('erase', dict(method='fp', learning_rate=0.05, nad={'learning_rate': 0.2}),
     "nad.learning_rate 0.2: erase with method 'fp' does not read it"),
    ('erase', dict(method='fp', config=fp_set(epochs=1), nad={'epochs': 3}),
     "nad.epochs 3: erase with method 'fp' does not read it"),
    ('erase', dict(method='fp', nad={'weight_decay': 0.5}),
     "nad.weight_decay 0.5: erase with method 'fp' does not read it"),
    ('erase', dict(method='nad', epochs=3, nad={'epochs': 5}),
     r"nad.epochs: given twice, as epochs=3 and nad=\{'epochs': 5\}; give one"),
    ('erase', dict(method='fp', batch_size=8, fp={'batch_size': 4}),
     r"fp.batch_size: given twice, as batch_size=8 and fp=\{'batch_size': 4\}"),
    ('erase', dict(method='nad', fp={'acc_drop': 2.0}),
     "fp.acc_drop 2.0: erase with method 'nad' does not read it; erase with method 'fp' does"),
    ('erase', dict(backdoor_training={'epochs': 9}),
     "backdoor_training.epochs 9: erase with method 'nad' does not read it; train_backdoored "
     'does'),
    ('erase', dict(data={'train_size': 9}),
     "data.train_size 9: erase with method 'nad' does not read it; load_data does"),
    ('evaluate', dict(nad={'epochs': 9}), 'nad.epochs 9: evaluate does not read it; erase does'),
    ('evaluate', dict(clean_fraction=0.3),
     'clean_fraction 0.3: evaluate does not read it; erase does'),
    ('evaluate', dict(seed=3), 'seed 3: evaluate does not read it; train_backdoored and erase do'),
    ('train_backdoored', dict(clean_fraction=0.9),
     'clean_fraction 0.9: train_backdoored does not read it; erase does'),
    ('train_backdoored', dict(teacher={'epochs': 9}),
     "teacher.epochs 9: train_backdoored does not read it; erase with method 'nad' does"),
])
def test_an_option_the_call_does_not_read_is_refused(small, function, options, message):
  """Accepted, it would change nothing the call computes (train_backdoored's clean_fraction:
  a log line's count) and still read as if it had."""
  data, variables = small
  args = (data,) if function == 'train_backdoored' else (data, variables)
  with pytest.raises(nad_jax.ConfigError, match=message):
    getattr(nad_jax, function)(*args, model='tiny', **options)


def test_evaluate_reads_the_seed_where_the_trigger_draws_per_image(small):
  """Refool blends each test image with a reflection drawn from the seed's stream, so its
  ASR depends on the seed; the seed is evaluate's field there."""
  data, variables = small
  refool = nad_jax.make_config(attack='refool')
  refool.attack.update(dict(reflection_source='heldout', selection_rounds=0, reflections=4,
                            reflection_candidates=4))
  assert nad_jax.evaluate(data, variables, config=refool, model='tiny', seed=1).keys() == {
      'acc', 'acc_nontarget', 'asr', 'ra'}


def test_a_config_given_is_not_refused_for_its_other_fields(small, monkeypatch):
  """config= sets every function's fields (one config for a whole run); only keywords are
  checked. FP's and MCR's own sections are options of erase without such a config."""
  data, variables = small
  made = stop_at_context(monkeypatch)
  config = nad_jax.make_config(clean_fraction=0.25, nad={'betas': (0.0, 0.0, 1.0)})
  with pytest.raises(Stopped):
    nad_jax.evaluate(data, variables, config=config, model='tiny')
  with pytest.raises(Stopped):
    nad_jax.erase(data, variables, method='fp', fp={'acc_drop': 2.0}, nad={'cutout': 2},
                  **SMALL)  # FP follows nad's schedule
  assert (made[-1].config.fp.acc_drop, made[-1].config.fp.cutout) == (2.0, 2)


def test_erase_refuses_a_teacher_it_would_not_use(small):
  data, variables = small
  with pytest.raises(nad_jax.ConfigError, match="teacher: NAD's, method 'ft' has no teacher"):
    nad_jax.erase(data, variables, method='ft', teacher=variables, **SMALL)
  config = nad_jax.make_config()
  config.teacher.checkpoint = '/teacher.pth'
  with pytest.raises(nad_jax.ConfigError, match="teacher= and teacher.checkpoint '/teacher.pth'"
                     ": two teachers; drop teacher= or set the config's teacher.checkpoint"):
    nad_jax.erase(data, variables, teacher=variables, config=config, **SMALL)


def test_what_no_call_reads_is_refused_with_its_reason():
  """An all-to-all backdoor has no target label; a loaded backdoored model no recipe."""
  with pytest.raises(nad_jax.ConfigError, match='target_label 3: an all-to-all backdoor'):
    nad_jax.evaluate(None, {}, attack='all2all', target_label=3)
  config = defaults.paper_config()
  config.student.checkpoint = 'model.pth'
  with pytest.raises(nad_jax.ConfigError, match='poison_rate 0.3: the backdoored model is '
                     'loaded from student.checkpoint'):
    nad_jax.train_backdoored(None, config=config, poison_rate=0.3)


def test_the_api_takes_models_as_variables_not_as_student_checkpoint():
  """train_backdoored would return the loaded model untrained; erase and evaluate would
  use `variables` and ignore the file."""
  data = nad_jax.load_data('synthetic', train_size=64, test_size=32)
  config = defaults.paper_config()
  config.student.checkpoint = ROOT  # an existing path
  calls = [lambda: nad_jax.train_backdoored(data, config=config, epochs=3),
           lambda: nad_jax.evaluate(data, {}, config=config),
           lambda: nad_jax.erase(data, {}, config=config, clean_fraction=0.5)]
  for call in calls:
    with pytest.raises(nad_jax.ConfigError, match=re.escape(
        f"student.checkpoint {ROOT!r}: the Python API takes the backdoored model as variables")):
      call()


def test_load_data_names_a_missing_folder(tmp_path):
  with pytest.raises(nad_jax.ConfigError, match=f"data.path '{tmp_path / 'none'}': must be an "
                     'existing folder'):
    nad_jax.load_data('folder', path=str(tmp_path / 'none'))


@pytest.fixture(scope='module')
def small():
  """204 synthetic training images (51 clean at clean_fraction 0.25) and a tiny net's
  random variables."""
  data = nad_jax.load_data('synthetic', train_size=204, test_size=64)
  variables = jax.device_get(models.initialize(models.build_model('tiny', data.num_classes),
                                               jax.random.key(0), data.test_images.shape[1:]))
  return data, variables


SMALL = dict(model='tiny', clean_fraction=0.25, epochs=1, batch_size=16)


@pytest.mark.parametrize('method,given,message', [
    ('ft', False, "teacher_epochs 3: NAD's teacher's, not a field of method 'ft'"),
    ('nad', True, r'teacher_epochs 3: the teacher is given \(teacher= or teacher.checkpoint\)'),
])
def test_erase_refuses_teacher_epochs_where_it_trains_no_teacher(small, method, given, message):
  data, variables = small
  with pytest.raises(nad_jax.ConfigError, match=message):
    nad_jax.erase(data, variables, method=method, teacher=variables if given else None,
                  teacher_epochs=3, **SMALL)


class Stopped(Exception):
  """Raised by the spy below once the stages' context is made, before anything trains."""


def stop_at_context(monkeypatch) -> list:
  """Makes stages.make_context raise Stopped once it made the Context; returns the list
  the Contexts are appended to."""
  made = []
  real = stages.make_context

  def make_context(config, *args, **kwargs):
    made.append(real(config, *args, **kwargs))  # checks each trained stage's batch size
    raise Stopped

  monkeypatch.setattr(stages, 'make_context', make_context)
  return made


def test_erase_batch_size_and_learning_rate_reach_the_teacher_it_trains(small, monkeypatch):
  """As nad-jax-clean's --batch-size and --lr: the teacher trained on the 51 clean images
  takes batch 16 too (its default 64 does not fit them) and the same learning rate."""
  data, variables = small
  made = stop_at_context(monkeypatch)
  with pytest.raises(Stopped):
    nad_jax.erase(data, variables, method='nad', learning_rate=0.02, **SMALL)
  config = made[0].config
  assert (config.teacher.batch_size, config.teacher.learning_rate) == (16, 0.02)
  assert (config.nad.batch_size, config.nad.learning_rate) == (16, 0.02)
