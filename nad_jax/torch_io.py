"""PyTorch checkpoints <-> Flax variables: WideResNets, PreAct-ResNet-18, ResNet-18, VGG-19-BN.

A Flax variable path maps to a PyTorch state_dict name by renaming each module
(one small function per model family) and the leaf (`LEAVES`); conv kernels are
HWIO in Flax and OIHW in PyTorch, Dense kernels (in, out) vs Linear (out, in).

  WideResNet (xternalz layout, the NAD authors' checkpoints):
    params/block2/layer_0/convShortcut/kernel  <->  block2.layer.0.convShortcut.weight
  PreAct-ResNet-18 (BackdoorBench layout):
    params/layer2_0/shortcut/kernel            <->  layer2.0.shortcut.0.weight
  ResNet-18 and VGG-19-BN (torchvision's, BackdoorBench's resnet18 and vgg19_bn):
    params/layer2_0/downsample_1/scale         <->  layer2.0.downsample.1.weight
    params/features_0/kernel                   <->  features.0.weight
  BatchNorm: params scale/bias <-> weight/bias, batch_stats mean/var <->
  running_mean/running_var (num_batches_tracked is ignored on import, 0 on export).

torch is imported only when a file is read or written (pip install 'nad-jax[torch]').

Export a stage that the pipeline trained to a PyTorch state_dict:
  python -m nad_jax.torch_io export WORKDIR/nad WORKDIR/nad_model.pth [--model wrn16_1]
"""

import argparse
import contextlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from nad_jax.checkpoint import CheckpointError

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


def _torchvision(module: str) -> str:
  """layer1_0 -> layer1.0, downsample_1 -> downsample.1, features_3 -> features.3, ...

  torchvision's ResNet-18 and VGG-19-BN (BackdoorBench's resnet18 and vgg19_bn)
  index their nn.Sequential children; Flax spells the '.' as '_'.
  """
  return re.sub(r'_(\d+)$', r'.\1', module)


FAMILIES = {'wide_resnet': _wide_resnet, 'preact_resnet': _preact_resnet,
            'resnet': _torchvision, 'vgg': _torchvision}


def family_of(variables: dict) -> str:
  """The naming family of a model's variables: a key of FAMILIES.

  Args:
    variables: {'params', ...} of a model (arrays or ShapeDtypeStructs).

  Returns:
    'vgg' if params has 'features_0' (torchvision's VGG); 'resnet' if it has
    'layer1_0' and 'fc' (torchvision's ResNet); 'preact_resnet' if it has
    'layer1_0' (and 'linear'); else 'wide_resnet'.
  """
  params = variables['params']
  if 'features_0' in params:
    return 'vgg'
  if 'layer1_0' in params:
    return 'resnet' if 'fc' in params else 'preact_resnet'
  return 'wide_resnet'


def torch_names(variables: dict) -> dict:
  """Flax variable path (tuple) -> PyTorch state_dict name, for every leaf of `variables`.

  Args:
    variables: {'params', 'batch_stats'} of a WideResNet or PreAct-ResNet-18.

  Returns:
    {('params', 'block1', 'layer_0', 'bn1', 'scale'): 'block1.layer.0.bn1.weight', ...}.
  """
  rename = FAMILIES[family_of(variables)]
  names = {}
  for path in traverse_util.flatten_dict(variables):
    collection, *modules, leaf = path
    names[path] = '.'.join([rename(m) for m in modules] + [LEAVES[collection, leaf]])
  return names


def _permute(shape, order):
  return tuple(shape[i] for i in order.get(len(shape), range(len(shape))))


def to_state_dict(variables: dict) -> dict:
  """Flax variables -> {PyTorch name: float32 numpy array in PyTorch layout}.

  Args:
    variables: {'params', 'batch_stats'} of a WideResNet or PreAct-ResNet-18.

  Returns:
    {name: float32 array}; conv kernels OIHW, Linear weights (out, in).
  """
  flat = traverse_util.flatten_dict(variables)
  return {name: np.transpose(np.asarray(flat[path], np.float32), TO_TORCH.get(flat[path].ndim))
          for path, name in torch_names(variables).items()}


def from_state_dict(state_dict: dict, abstract_variables: dict, source: str = 'state_dict') -> dict:
  """{PyTorch name: array} -> Flax {'params', 'batch_stats'} shaped like `abstract_variables`.

  A 'module.' prefix (DataParallel) is stripped and num_batches_tracked ignored.
  Missing or unexpected names and mis-shaped tensors raise one CheckpointError.

  Args:
    state_dict: {PyTorch name: array in PyTorch layout}.
    abstract_variables: {'params', 'batch_stats'} of the configured model, as
      arrays or ShapeDtypeStructs.
    source: what the message calls the state_dict (e.g. its file).

  Returns:
    Nested numpy variables in Flax layout, with `abstract_variables`' dtypes.

  Raises:
    CheckpointError: the names or shapes do not fit the model; the message
      lists up to 12 of each kind.
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

def _torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'{path}: files are read and written as PyTorch checkpoints, which '
                          "needs torch: pip install 'nad-jax[torch]'") from None
  return torch


# Sentences of a torch.load error that advise loading unsafely or merely point elsewhere.
ADVICE = re.compile(r'weights.only|safe_globals|trust|documentation|file an issue', re.IGNORECASE)


def _load_failure(error: Exception) -> str:
  """The gist of a torch.load error as one short line, without its advice.

  PyTorch's message spans several lines and suggests `weights_only=False`, which
  runs arbitrary code from a file of unknown origin; only what went wrong is kept.
  """
  text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))  # ANSI bold around a warning
  text = text.split('WeightsUnpickler error:')[-1]
  sentences = [s.strip() for line in text.splitlines() for s in re.split(r'(?<=[.?!])\s+', line)]
  gist = ' '.join(s for s in sentences if s and not ADVICE.search(s))
  gist = f'{type(error).__name__}: {gist}' if gist else type(error).__name__
  return gist if len(gist) <= 200 else gist[:197] + '...'


def read_file(path: str, allowed: Sequence[Any] = (), what: str = 'a PyTorch checkpoint') -> Any:
  """torch.load of any file torch.save wrote, without running code from it.

  The file is unpickled with weights_only=True: tensors, containers and plain
  Python values, plus the classes and functions of `allowed` and nothing else.

  Args:
    path: a file written by torch.save (.pth, .pt, .pth.tar, .ckpt, ...).
    allowed: further globals the unpickler may use, as
      `torch.serialization.safe_globals` takes them (an object, or an (object,
      'module.name') pair for a name it was pickled under); needs torch >= 2.6.
    what: what the file should be, for the messages (e.g. 'a BackdoorBench record').

  Returns:
    The unpickled content, tensors on the CPU.

  Raises:
    CheckpointError: `path` is missing, a folder, empty, or not something
      torch.load reads with weights_only=True under `allowed`; torch is not
      installed. The message is one line naming `path`.
  """
  if not os.path.exists(path):
    raise CheckpointError(f'{path} does not exist')
  if os.path.isdir(path):
    raise CheckpointError(f'{path} is a folder, not {what} file')
  if os.path.getsize(path) == 0:
    raise CheckpointError(f'{path} is an empty file, not {what}')
  torch = _torch(path)
  if allowed and not hasattr(torch.serialization, 'safe_globals'):
    raise CheckpointError(f'{path}: reading {what} needs torch >= 2.6 (found {torch.__version__})')
  context = torch.serialization.safe_globals(list(allowed)) if allowed else contextlib.nullcontext()
  try:
    with context:
      return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (unpickling, zip and I/O errors)
    raise CheckpointError(f'{path} is not {what} nad-jax can read safely '
                          f'(torch.load with weights_only=True failed: {_load_failure(e)})') from None


def read_state_dict(path: str) -> dict:
  """Reads a PyTorch checkpoint file, whatever its name, without running code from it.

  Args:
    path: a file written by torch.save (.pth, .pt, .pth.tar, .ckpt, ...).

  Returns:
    {name: numpy array}, floats as float32; {'state_dict': {...}} is unwrapped.

  Raises:
    CheckpointError: as `read_file`, or the file holds no state_dict; the
      message is one line.
  """
  content = read_file(path)
  if isinstance(content, dict) and isinstance(content.get('state_dict'), dict):
    content = content['state_dict']
  return numpy_state_dict(content, path)


def numpy_state_dict(content: Any, source: str) -> dict:
  """A state_dict of torch tensors as numpy arrays, checked to be one.

  Args:
    content: what should be {name: torch.Tensor}.
    source: what the message calls it (e.g. its file).

  Returns:
    {name: numpy array}, floating tensors as float32, others in their dtype.

  Raises:
    CheckpointError: `content` is not a dict of tensors.
  """
  torch = _torch(source)
  if not isinstance(content, dict) or not all(torch.is_tensor(v) for v in content.values()):
    raise CheckpointError(f'{source} holds no state_dict (expected a dict of tensors, '
                          "or a dict with one under 'state_dict')")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in content.items()}


def load(path: str, abstract_variables: dict) -> dict:
  """Flax variables from a PyTorch checkpoint file, checked against `abstract_variables`.

  Args:
    path: a file torch.save wrote.
    abstract_variables: {'params', 'batch_stats'} of the configured model.

  Returns:
    As `from_state_dict`.

  Raises:
    CheckpointError: as `read_state_dict` and `from_state_dict`.
  """
  return from_state_dict(read_state_dict(path), abstract_variables, path)


def torch_state_dict(variables: dict, source: str = 'export') -> dict:
  """Flax variables -> a PyTorch state_dict of tensors that loads with strict=True.

  Each BatchNorm also gets num_batches_tracked = 0.

  Args:
    variables: {'params', 'batch_stats'} of a model of FAMILIES.
    source: what a missing-torch message names.

  Returns:
    {PyTorch name: float32 torch.Tensor in PyTorch layout} (num_batches_tracked int64).

  Raises:
    CheckpointError: torch is not installed.
  """
  torch = _torch(source)
  state_dict = {}
  for name, array in to_state_dict(variables).items():
    state_dict[name] = torch.tensor(array)
    if name.endswith('running_var'):
      state_dict[name.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
  return state_dict


def write_file(content: Any, path: str) -> None:
  """torch.save(content, path).

  Args:
    content: tensors, containers and plain values (what `read_file` reads back).
    path: the file to write.

  Raises:
    CheckpointError: torch is not installed.
  """
  _torch(path).save(content, path)


def save(variables: dict, path: str) -> None:
  """Writes `variables` as a plain PyTorch state_dict (`torch_state_dict`; strict=True loads it).

  Args:
    variables: {'params', 'batch_stats'} of a model of FAMILIES.
    path: the file to write.

  Raises:
    CheckpointError: torch is not installed.
  """
  write_file(torch_state_dict(variables, path), path)


def main(argv: list[str] | None = None) -> None:
  """The command line: `export CHECKPOINT OUTPUT [--model NAME] [--num_classes N]`.

  Exports a nad-jax checkpoint (a stage folder or one epoch of it) of a model
  on 32x32 RGB images to a PyTorch .pth file.

  Args:
    argv: the arguments; None: sys.argv[1:].

  Raises:
    SystemExit: bad arguments, or an unknown model or unusable checkpoint (the
      message starts 'error:').
  """
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
