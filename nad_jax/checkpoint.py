"""Orbax checkpoints: one CheckpointManager per stage, one step per finished epoch.

A step holds the TrainState (params, batch_stats, optimizer state; never the
sown intermediates) and the stage's metric history, so a resumed stage carries
on from its last epoch and reports exactly what an uninterrupted one would.
Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous step intact.
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint path that cannot be read as the configured model."""


class StageCheckpoints:
  """The checkpoints of one stage, in `directory`, keyed by epoch."""

  def __init__(self, directory: str, keep: int = 2):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_epoch(self) -> int | None:
    return self.manager.latest_step()

  def save(self, epoch: int, state, history: list) -> None:
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()

  def restore(self, epoch: int, abstract_state):
    """Returns (state, history) saved at `epoch`, laid out like `abstract_state`."""
    restored = self.manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), history=ocp.args.JsonRestore()))
    return restored.state, restored.history

  def close(self) -> None:
    self.manager.close()


def load_variables(path: str, abstract_variables) -> dict:
  """Params and batch_stats from a checkpoint this project wrote.

  `path` may be a stage folder (its latest epoch is used) or one epoch's folder.
  Shapes are checked against `abstract_variables`; a mismatch names the arrays.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint {path} does not exist')
  steps = [int(d) for d in os.listdir(path) if d.isdigit()]
  if steps:
    path = os.path.join(path, str(max(steps)))
  state_path = os.path.join(path, 'state')
  if not os.path.isdir(state_path):
    raise CheckpointError(f'checkpoint {path} holds no nad-jax state '
                          '(expected a stage folder or one of its epoch folders)')
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(state_path)
  variables = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  check_shapes(variables, abstract_variables, path)
  return variables


def check_shapes(variables, abstract_variables, source: str) -> None:
  """Raises CheckpointError listing missing, unexpected and mis-shaped arrays."""
  flat = lambda tree: {jax.tree_util.keystr(k): v.shape
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(variables), flat(abstract_variables)
  problems = [f'missing {k}' for k in want.keys() - have.keys()]
  problems += [f'unexpected {k}' for k in have.keys() - want.keys()]
  problems += [f'{k}: shape {have[k]} != {want[k]}' for k in want.keys() & have.keys()
               if tuple(have[k]) != tuple(want[k])]
  if problems:
    raise CheckpointError(f'checkpoint {source} does not fit the model: ' + '; '.join(sorted(problems)))
