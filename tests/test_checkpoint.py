"""Stage checkpoints (nad_jax.checkpoint): resuming, and one-line errors for unusable folders."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nad_jax import models, train
from nad_jax.checkpoint import CheckpointError, StageCheckpoints, load_variables
from nad_jax import defaults

HISTORY = [{'epoch': 0, 'acc': 10.0}, {'epoch': 2, 'ce': 2.25}]


def make_state(name='tiny', num_classes=10, tx=None):
  """A TrainState laid out as the pipeline's (replicated over the test mesh)."""
  tx = tx or train.make_optimizer(defaults.paper_config().nad, steps_per_epoch=10)
  state = train.init_state(models.build_model(name, num_classes), tx, jax.random.key(0),
                           (32, 32, 3))
  return train.replicate(state, train.make_mesh())


def abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def variables_of(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


def assert_one_line(message: str, path) -> None:
  """A message a user can act on: it names `path`, fits a line, and gives no unsafe advice."""
  assert str(path) in message
  assert '\n' not in message and '\r' not in message
  for banned in ('weights_only=False', 'partial_restore', 'Traceback'):
    assert banned not in message


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """A tiny-model stage with epochs 1 and 2, written once; tests copy it before changing it."""
  stage = tmp_path_factory.mktemp('written') / 'stage'
  checkpoints = StageCheckpoints(str(stage))
  state = make_state()
  checkpoints.save(1, state, HISTORY[:1])
  checkpoints.save(2, state, HISTORY)
  checkpoints.close()
  return stage, jax.device_get(state)


@pytest.fixture
def stage(written, tmp_path):
  path = tmp_path / 'stage'
  shutil.copytree(written[0], path)
  return path


# ------------------------------------------------------------------------- resuming

def test_restore_returns_the_saved_state_and_history(stage, written):
  checkpoints = StageCheckpoints(str(stage))
  assert checkpoints.latest_epoch() == 2
  state, history = checkpoints.restore(2, abstract(make_state()))
  checkpoints.close()
  assert history == HISTORY
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), written[1])


def test_latest_epoch_ignores_junk_and_temporary_steps(stage):
  (stage / '3.orbax-checkpoint-tmp-1712345678').mkdir()  # a save killed half-way
  (stage / '3.orbax-checkpoint-tmp-1712345678' / 'state').mkdir()
  (stage / 'notes').mkdir()
  (stage / 'notes.txt').write_text('not a step')
  (stage / '9').mkdir()  # numbered, but orbax never finished it
  (stage / '4').mkdir()
  checkpoints = StageCheckpoints(str(stage))
  assert checkpoints.latest_epoch() == 2
  # Saving goes on: over the unfinished '4', and despite the higher '9'.
  checkpoints.save(4, make_state(), HISTORY + [{'epoch': 4}])
  assert checkpoints.latest_epoch() == 4
  _, history = checkpoints.restore(4, abstract(make_state()))
  checkpoints.close()
  assert history[-1] == {'epoch': 4}
  # Orbax deletes leftover temporary folders in the background once the stage is opened.
  assert not (stage / '3.orbax-checkpoint-tmp-1712345678').exists()


def test_stage_path_that_is_a_file(tmp_path):
  path = tmp_path / 'nad'
  path.write_text('x')
  with pytest.raises(CheckpointError, match='is a file, not a folder') as error:
    StageCheckpoints(str(path))
  assert_one_line(str(error.value), path)


# ------------------------------------------------------------- restoring a mismatch

@pytest.mark.parametrize('state_fn, reason', [
    (lambda: make_state('wrn16_1'), r'missing \(\d+\): .* and \d+ more; unexpected'),
    (lambda: make_state(num_classes=5), r'wrong shape \(4\): .*fc/bias \(10,\) \(expected \(5,\)\)'),
    (lambda: make_state(tx=optax.sgd(0.1)), r'unexpected \(\d+\): opt_state/'),
    (lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                          make_state()), r'wrong dtype \(\d+\): .* float32 \(expected bfloat16\)'),
], ids=['another_model', 'another_num_classes', 'another_optimizer', 'another_dtype'])
def test_restore_as_another_config_is_one_line(stage, state_fn, reason):
  checkpoints = StageCheckpoints(str(stage))
  with pytest.raises(CheckpointError, match=reason) as error:
    checkpoints.restore(2, abstract(state_fn()))
  checkpoints.close()
  message = str(error.value)
  assert_one_line(message, stage / '2')
  assert message.startswith(f"stage checkpoint {stage / '2'} cannot be restored as this run's")
  assert message.endswith('it was written by a run with another config: '
                          'use another --workdir or delete the folder')
  assert len(message.split(' (', 1)[1].rsplit(');', 1)[0]) <= 300


# -------------------------------------------------------------------- damaged files

def state_files(epoch_dir, pattern):
  files = glob.glob(os.path.join(epoch_dir, 'state', '**', pattern), recursive=True)
  assert files, pattern
  return files


def delete_data(epoch_dir):
  for f in state_files(epoch_dir, 'd/*'):
    os.remove(f)


def truncate_data(epoch_dir):
  for f in state_files(epoch_dir, 'd/*'):
    with open(f, 'r+b') as handle:
      handle.truncate(os.path.getsize(f) // 2)


def delete_manifests(epoch_dir):
  for f in state_files(epoch_dir, 'manifest.ocdbt'):
    os.remove(f)


def delete_metadata(epoch_dir):
  os.remove(os.path.join(epoch_dir, 'state', '_METADATA'))


def garble_metadata(epoch_dir):
  with open(os.path.join(epoch_dir, 'state', '_METADATA'), 'w') as handle:
    handle.write('{"tree_metadata": ')


DAMAGE = [delete_data, truncate_data, delete_manifests, delete_metadata, garble_metadata]


@pytest.mark.parametrize('damage', DAMAGE, ids=lambda f: f.__name__)
def test_restore_damaged_epoch_is_one_line(stage, damage):
  damage(stage / '2')
  checkpoints = StageCheckpoints(str(stage))
  with pytest.raises(CheckpointError, match='cannot read it: .*damaged or incomplete') as error:
    checkpoints.restore(2, abstract(make_state()))
  checkpoints.close()
  assert_one_line(str(error.value), stage / '2')
  assert len(str(error.value)) < 500


@pytest.mark.parametrize('damage', DAMAGE, ids=lambda f: f.__name__)
def test_load_variables_damaged_epoch_is_one_line(stage, damage):
  damage(stage / '2')
  with pytest.raises(CheckpointError, match='not a readable|damaged or incomplete') as error:
    load_variables(str(stage), abstract(variables_of(make_state())))
  assert_one_line(str(error.value), stage / '2')
  assert len(str(error.value)) < 500


# ------------------------------------------------------------------- load_variables

def test_load_variables_from_stage_or_epoch_folder(stage, written):
  want = jax.device_get(variables_of(written[1]))
  for path in (stage, stage / '1'):
    loaded = load_variables(str(path), abstract(variables_of(make_state())))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), want)


def test_load_variables_skips_unfinished_epochs(stage, written):
  (stage / '5').mkdir()
  (stage / '6.orbax-checkpoint-tmp-1').mkdir()
  loaded = load_variables(str(stage), abstract(variables_of(make_state())))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
               jax.device_get(variables_of(written[1])))


def test_load_variables_of_another_model_names_the_arrays(stage):
  with pytest.raises(CheckpointError) as error:
    load_variables(str(stage), abstract(variables_of(make_state('wrn16_1'))))
  message = str(error.value)
  assert_one_line(message, stage / '2')
  for part in ('does not fit the model', 'missing (', 'unexpected (',
               'params/conv1/kernel (3, 3, 3, 8) (expected (3, 3, 3, 16))'):
    assert part in message
  assert '... and' in message and len(message) < 4000


def test_load_variables_reports_dtype(stage):
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                      abstract(variables_of(make_state())))
  with pytest.raises(CheckpointError, match=r'wrong dtype \(\d+\): .*float32 \(expected bfloat16\)'):
    load_variables(str(stage), bf16)


@pytest.mark.parametrize('kind, fragment', [
    ('missing', 'does not exist'),
    ('file', 'is a file, not a nad-jax stage or epoch folder'),
    ('empty_folder', 'holds no nad-jax state'),
    ('other_folder', 'holds no nad-jax state'),
    ('unfinished_step', 'holds no nad-jax state'),
])
def test_load_variables_of_a_folder_that_is_no_stage(tmp_path, kind, fragment):
  path = tmp_path / 'checkpoint'
  if kind == 'file':
    path.write_bytes(b'\x00' * 64)
  elif kind != 'missing':
    path.mkdir()
  if kind == 'other_folder':
    (path / 'images').mkdir()
    (path / 'README').write_text('hello')
  if kind == 'unfinished_step':
    (path / '3').mkdir()
  with pytest.raises(CheckpointError, match=fragment) as error:
    load_variables(str(path), abstract(variables_of(make_state())))
  assert_one_line(str(error.value), path)
