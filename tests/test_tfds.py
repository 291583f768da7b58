"""The tfds source through tfds's real download-and-prepare path, offline.

`tfds.testing.mock_data` never enters `download_and_prepare`, which is what every real
tfds user runs; these builders do, into a temporary data_dir.
"""

import numpy as np
import pytest

from configs import tiny
from nad_jax import data, stages
from nad_jax.experiments import nad as nad_runner

pytest.importorskip('tensorflow_datasets',
                    reason="tfds is not installed (pip install 'nad-jax[tfds]')")
from tests.tfds_builders import TEST, TRAIN  # pylint: disable=g-import-not-at-top  (registers them)

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them


def tfds_config(name, data_dir):
  config = tiny.get_config()
  config.data.source = 'tfds'
  config.data.name = name
  config.data.data_dir = str(data_dir)
  return config


def test_prepares_offline_then_the_pipeline_runs_on_it(tmp_path):
  config = tfds_config('nad_test_images', tmp_path / 'tfds')
  ds = data.load_dataset(config.data)  # download_and_prepare, then read
  assert ds.num_classes == 10
  assert ds.train_images.shape == (TRAIN, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (TEST, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), np.bincount(np.arange(TRAIN) % 10))
  assert (tmp_path / 'tfds' / 'nad_test_images' / '1.0.0').is_dir()
  results = nad_runner.run(config, str(tmp_path / 'run')).results
  assert set(results['stages']) == {'backdoored', 'teacher', 'nad'}


def test_a_failed_download_is_one_message_naming_name_and_data_dir(tmp_path):
  config = tfds_config('nad_test_unreachable', tmp_path / 'tfds')
  with pytest.raises(stages.ConfigError) as error:
    nad_runner.run(config, str(tmp_path / 'run')).results
  message = str(error.value)
  assert "data.name 'nad_test_unreachable'" in message
  assert str(tmp_path / 'tfds') in message
  assert 'ConnectionError' in message and "data.source='folder'" in message
  assert 'tfds build nad_test_unreachable' in message
  assert '\n' not in message
  assert not (tmp_path / 'run').exists()  # nothing written


def test_an_unknown_builder_names_data_name(tmp_path):
  with pytest.raises(data.DataError, match="data.name 'no_such_dataset_xyz'"):
    data.tfds_source('no_such_dataset_xyz', str(tmp_path))
