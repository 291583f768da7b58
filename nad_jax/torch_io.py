"""PyTorch checkpoints <-> Flax variables, for the WideResNet family and PreAct-ResNet-18.

A Flax variable path maps to a PyTorch state_dict name by renaming each module
(one small function per model family) and the leaf (`LEAVES`); conv kernels are
HWIO in Flax and OIHW in PyTorch, Dense kernels (in, out) vs Linear (out, in).

  WideResNet (xternalz layout, the NAD authors' checkpoints):
    params/block2/layer_0/convShortcut/kernel  <->  block2.layer.0.convShortcut.weight
  PreAct-ResNet-18 (BackdoorBench layout):
    params/layer2_0/shortcut/kernel            <->  layer2.0.shortcut.0.weight
  BatchNorm: params scale/bias <-> weight/bias, batch_stats mean/var <->
  running_mean/running_var (num_batches_tracked is ignored on import, 0 on export).

torch is imported only when a file is read or written (pip install 'nad-jax[torch]').

Export a stage that the pipeline trained to a PyTorch state_dict:
  python -m nad_jax.torch_io export WORKDIR/nad WORKDIR/nad_model.pth [--model wrn16_1]
"""

import argparse
import re

import numpy as np
from flax import traverse_util

from nad_jax.checkpoint import CheckpointError

SUFFIXES = ('.pth', '.pt', '.tar')  # file names that pipeline.pretrained() reads with torch

# (Flax collection, leaf name) -> PyTorch tensor name.
LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
          ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
          ('batch_stats', 'var'): 'running_var'}
# Axis order of a Flax array in PyTorch, by rank (conv HWIO -> OIHW, Dense (in,out) -> (out,in)).
TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}
TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}


def _wide_resnet(module: str) -> str:
  """block1/layer_0/bn1 -> block1.layer.0.bn1 (the torch blocks sit in an nn.Sequential `layer`)."""
  return re.sub(r'^layer_(\d+)$', r'layer.\1', module)


def _preact_resnet(module: str) -> str:
  """layer1_0 -> layer1.0; shortcut -> shortcut.0 (a one-conv nn.Sequential)."""
  return 'shortcut.0' if module == 'shortcut' else re.sub(r'^(layer\d+)_(\d+)$', r'\1.\2', module)


FAMILIES = {'wide_resnet': _wide_resnet, 'preact_resnet': _preact_resnet}


def family_of(variables) -> str:
  return 'preact_resnet' if 'layer1_0' in variables['params'] else 'wide_resnet'


def torch_names(variables) -> dict:
  """Flax variable path (tuple) -> PyTorch state_dict name, for every leaf of `variables`."""
  rename = FAMILIES[family_of(variables)]
  names = {}
  for path in traverse_util.flatten_dict(variables):
    collection, *modules, leaf = path
    names[path] = '.'.join([rename(m) for m in modules] + [LEAVES[collection, leaf]])
  return names


def _permute(shape, order):
  return tuple(shape[i] for i in order.get(len(shape), range(len(shape))))


def to_state_dict(variables) -> dict:
  """Flax variables -> {PyTorch name: float32 numpy array in PyTorch layout}."""
  flat = traverse_util.flatten_dict(variables)
  return {name: np.transpose(np.asarray(flat[path], np.float32), TO_TORCH.get(flat[path].ndim))
          for path, name in torch_names(variables).items()}


def from_state_dict(state_dict: dict, abstract_variables, source: str = 'state_dict') -> dict:
  """{PyTorch name: array} -> Flax {'params', 'batch_stats'} shaped like `abstract_variables`.

  A 'module.' prefix (DataParallel) is stripped and num_batches_tracked ignored.
  Missing or unexpected names and mis-shaped tensors raise one CheckpointError.
  """
  state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()
                if not k.endswith('num_batches_tracked')}
  names = torch_names(abstract_variables)
  abstract = traverse_util.flatten_dict(abstract_variables)
  want = {name: _permute(abstract[path].shape, TO_TORCH) for path, name in names.items()}
  have = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  problems = []
  for label, items in (('missing', sorted(want.keys() - have.keys())),
                       ('unexpected', sorted(have.keys() - want.keys())),
                       ('wrong shape', [f'{k} {have[k]} (expected {want[k]})'
                                        for k in want.keys() & have.keys() if have[k] != want[k]])):
    if items:
      more = f' ... and {len(items) - 12} more' if len(items) > 12 else ''
      problems.append(f'{label} ({len(items)}): ' + ', '.join(sorted(items)[:12]) + more)
  if problems:
    raise CheckpointError(
        f'{source} does not fit the {family_of(abstract_variables)} model '
        '(is config.model.name the architecture it was trained with?): ' + '; '.join(problems))
  return traverse_util.unflatten_dict({
      path: np.transpose(np.asarray(state_dict[name], np.float32), TO_FLAX.get(len(want[name])))
      .astype(abstract[path].dtype) for path, name in names.items()})


# ----------------------------------------------------------------------------- files

def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError("PyTorch checkpoints need torch: pip install 'nad-jax[torch]'") from None
  return torch


def read_state_dict(path: str) -> dict:
  """A .pth/.pt/.pth.tar file -> {name: float32 numpy array}; accepts {'state_dict': ...} too."""
  torch = _torch()
  try:
    content = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (unpickling, zip and I/O errors)
    raise CheckpointError(f'cannot read PyTorch checkpoint {path}: {e}') from None
  if isinstance(content, dict) and isinstance(content.get('state_dict'), dict):
    content = content['state_dict']
  if not isinstance(content, dict) or not all(torch.is_tensor(v) for v in content.values()):
    raise CheckpointError(f'{path} holds no state_dict (expected a dict of tensors, '
                          "or a dict with one under 'state_dict')")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in content.items()}


def load(path: str, abstract_variables) -> dict:
  """Flax variables from a PyTorch checkpoint file, checked against `abstract_variables`."""
  return from_state_dict(read_state_dict(path), abstract_variables, path)


def save(variables, path: str) -> None:
  """Writes `variables` as a plain PyTorch state_dict (loads with strict=True)."""
  torch = _torch()
  state_dict = {}
  for name, array in to_state_dict(variables).items():
    state_dict[name] = torch.tensor(array)
    if name.endswith('running_var'):
      state_dict[name.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
  torch.save(state_dict, path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m nad_jax.torch_io', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  export = commands.add_parser('export', help='a nad-jax checkpoint -> a PyTorch .pth file')
  export.add_argument('checkpoint', help='a stage folder (e.g. WORKDIR/nad) or one epoch of it')
  export.add_argument('output', help='the .pth file to write')
  export.add_argument('--model', default='wrn16_1', help='config.model.name of the run')
  export.add_argument('--num_classes', type=int, default=10)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nad_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  try:
    model = models.build_model(args.model, args.num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    save(checkpoint.load_variables(args.checkpoint, abstract), args.output)
  except (KeyError, CheckpointError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
