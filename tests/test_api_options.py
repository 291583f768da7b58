"""The Python API's options, without training: what make_config and load_data accept, and
the one ConfigError, naming the field, that each wrong option gets."""

import ml_collections
import pytest

import nad_jax
from nad_jax import defaults


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
])
def test_a_wrong_option_names_its_field(options, message):
  with pytest.raises(nad_jax.ConfigError, match=message):
    nad_jax.make_config(**options)


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


def test_load_data_names_a_missing_folder(tmp_path):
  with pytest.raises(nad_jax.ConfigError, match=f"data.path '{tmp_path / 'none'}': must be an "
                     'existing folder'):
    nad_jax.load_data('folder', path=str(tmp_path / 'none'))
