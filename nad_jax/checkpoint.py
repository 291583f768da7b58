"""Orbax checkpoints: one CheckpointManager per stage, one step per finished epoch.

A step holds the TrainState (params, batch_stats, optimizer state; never the
sown intermediates) and the stage's metric history, so a resumed stage carries
on from its last epoch and reports exactly what an uninterrupted one would.
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous step intact; the leftover
temporary folder is deleted when the stage is opened again.

Every checkpoint that cannot be used (a missing or foreign folder, damaged
files, arrays of another model or optimizer) ends in one CheckpointError whose
message is one line naming the folder.
"""

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# Orbax writes this file into a step folder just before the step becomes final,
# so a numbered folder without it is half-written or not orbax's.
COMMITTED = 'commit_success.txt'
# Arrays named per kind of mismatch in a message; a stage restore has room for fewer.
LIST_LIMIT = 12
REASON_LIMIT = 300


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as the configured model."""


def finished_epochs(directory: str) -> list[int]:
  """The epochs in a stage folder whose step orbax finished writing, ascending.

  Args:
    directory: a stage folder; a missing one has no epochs.

  Returns:
    The epoch numbers; leftover temporary steps and unrelated files are ignored.
  """
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(name) for name in names if re.fullmatch(r'0|[1-9][0-9]*', name)
                and os.path.isfile(os.path.join(directory, name, COMMITTED)))


class StageCheckpoints:
  """The checkpoints of one stage, in `directory`, keyed by epoch."""

  def __init__(self, directory: str, keep: int = 2):
    """Opens (and creates) the stage folder; orbax deletes leftover temporary steps.

    Args:
      directory: the stage folder.
      keep: how many most recent epochs orbax keeps.

    Raises:
      CheckpointError: `directory` is a file.
    """
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f'stage checkpoint folder {self.directory} is a file, not a folder')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def latest_epoch(self) -> int | None:
    """The last finished epoch, or None; half-written or foreign folders do not count.

    Returns:
      The highest of `finished_epochs(directory)`, or None if there is none.
    """
    return max(finished_epochs(self.directory), default=None)

  def save(self, epoch: int, state, history: list) -> None:
    """Saves one epoch and waits until it is on disk.

    A half-written folder of the same epoch is deleted first.

    Args:
      epoch: the epoch number (the orbax step).
      state: the TrainState (any pytree of arrays).
      history: the stage's metric history so far, JSON-serialisable.
    """
    if epoch in self.manager.all_steps() and epoch not in finished_epochs(self.directory):
      # A half-written folder of this epoch; orbax would refuse to write over it.
      self.manager.delete(epoch)
    # force: the pipeline decides which epochs to save, and orbax would silently
    # skip any epoch below a stray higher-numbered folder.
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)), force=True)
    self.manager.wait_until_finished()

  def restore(self, epoch: int, abstract_state) -> tuple:
    """Restores one epoch of this stage.

    Args:
      epoch: a finished epoch, e.g. `latest_epoch()`.
      abstract_state: the TrainState of this run, as arrays or ShapeDtypeStructs;
        the restored one has its structure, shapes, dtypes and shardings.

    Returns:
      (state, history) saved at `epoch`.

    Raises:
      CheckpointError: the saved arrays differ from `abstract_state` in names,
        shapes or dtypes, or the epoch's files cannot be read.
    """
    step = os.path.join(self.directory, str(epoch))
    prefix = f"stage checkpoint {step} cannot be restored as this run's model and optimizer"
    advice = 'use another --workdir or delete the folder'
    try:
      stored = _arrays(_metadata(os.path.join(step, 'state')))
    except Exception as e:  # pylint: disable=broad-except  (missing or corrupt metadata)
      raise CheckpointError(f'{prefix} (cannot read it: {_gist(e)}); '
                            f'it is damaged or incomplete: {advice}') from None
    problems = _mismatches(stored, _arrays(abstract_state), limit=2)
    if problems:
      raise CheckpointError(f'{prefix} ({_clip(problems, REASON_LIMIT)}); '
                            f'it was written by a run with another config: {advice}')
    try:
      restored = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), history=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
      raise CheckpointError(f'{prefix} (cannot read it: {_gist(e)}); '
                            f'it is damaged or incomplete: {advice}') from None
    return restored.state, restored.history

  def close(self) -> None:
    """Closes the orbax CheckpointManager."""
    self.manager.close()


def load_variables(path: str, abstract_variables: dict) -> dict:
  """Params and batch_stats from a checkpoint this project wrote.

  Args:
    path: a stage folder (its latest finished epoch is used) or one epoch's folder.
    abstract_variables: {'params', 'batch_stats'} of the configured model, as
      arrays or ShapeDtypeStructs.

  Returns:
    {'params', 'batch_stats'} as numpy arrays on the host, whatever devices wrote them.

  Raises:
    CheckpointError: `path` is not such a folder, its files cannot be read, or
      its arrays differ from `abstract_variables` (the message names them).
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint {path} does not exist')
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint {path} is a file, not a nad-jax stage or epoch folder')
  epochs = finished_epochs(path)
  if epochs:
    path = os.path.join(path, str(epochs[-1]))
  state_path = os.path.join(path, 'state')
  if not os.path.isdir(state_path):
    raise CheckpointError(f'checkpoint {path} holds no nad-jax state '
                          '(expected a stage folder or one of its epoch folders)')
  try:
    metadata = _metadata(state_path)
  except Exception as e:  # pylint: disable=broad-except  (missing or corrupt metadata)
    raise CheckpointError(f'checkpoint {path} is not a readable nad-jax checkpoint '
                          f'({_gist(e)})') from None
  stored = {k: v for k, v in _arrays(metadata).items()
            if k.startswith(('params/', 'batch_stats/'))}
  problems = _mismatches(stored, _arrays(abstract_variables), limit=LIST_LIMIT)
  if problems:
    raise CheckpointError(f'checkpoint {path} does not fit the model: {problems}')
  # Onto this process's first device, whatever devices wrote it: the devices of another
  # run (more or fewer, or another process's, as after a multi-process run) may not exist here.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata)
  handler = ocp.StandardCheckpointHandler()
  try:
    state = handler.restore(epath.Path(state_path), args=ocp.args.StandardRestore(target))
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
    raise CheckpointError(f'checkpoint {path} cannot be read, its files are damaged or '
                          f'incomplete ({_gist(e)})') from None
  finally:
    handler.close()
  # Host arrays: the caller places them (replicated over its mesh, or as they are).
  return jax.device_get({'params': state['params'], 'batch_stats': state.get('batch_stats', {})})


def mismatches(variables, abstract_variables, limit: int = LIST_LIMIT) -> str:
  """'' where `variables` has the arrays of `abstract_variables`, else what differs.

  Args:
    variables: a pytree of arrays (e.g. {'params', 'batch_stats'}).
    abstract_variables: the expected pytree, as arrays or ShapeDtypeStructs.
    limit: how many arrays to name per kind of mismatch.

  Returns:
    One line: missing, unexpected, mis-shaped and mis-typed arrays, or ''.
  """
  return _mismatches(_arrays(variables), _arrays(abstract_variables), limit)


def _arrays(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{'params/conv1/kernel': (shape, dtype)} for every array-like leaf of `tree`.

  Names join the keys as orbax does, so a TrainState, its abstract version and
  the metadata tree of its checkpoint give the same names.
  """
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
  return {name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')}


def _metadata(state_path: str):
  """The tree of a saved state's array metadata (shape, dtype, sharding; no array is read)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(state_path)).tree
  finally:
    handler.close()


def _mismatches(have: dict, want: dict, limit: int) -> str:
  """Missing, unexpected, mis-shaped and mis-typed arrays, at most `limit` of each named."""
  common = sorted(want.keys() & have.keys())
  kinds = {
      'missing': sorted(want.keys() - have.keys()),
      'unexpected': sorted(have.keys() - want.keys()),
      'wrong shape': [f'{k} {have[k][0]} (expected {want[k][0]})' for k in common
                      if have[k][0] != want[k][0]],
      'wrong dtype': [f'{k} {have[k][1]} (expected {want[k][1]})' for k in common
                      if have[k][1] != want[k][1]],
  }
  parts = []
  for kind, items in kinds.items():
    if items:
      more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
      parts.append(f'{kind} ({len(items)}): ' + ', '.join(items[:limit]) + more)
  return '; '.join(parts)


def _gist(error: Exception) -> str:
  """An exception as one short line: its type and the first line of its message."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  # Tensorstore appends a dump of its whole spec to the first line.
  first = re.split(r' See full TensorStore details| \[tensorstore_spec', lines[0])[0] if lines else ''
  return _clip(f'{type(error).__name__}: {first}' if first else type(error).__name__, 200)


def _clip(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit - 3] + '...'
