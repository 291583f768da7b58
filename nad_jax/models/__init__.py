"""Model registry: config names to Flax modules.

Every model sows the output of each of its residual groups into the
'intermediates' collection as 'group1', 'group2', ...; `distill_layers` names the
three (low, middle, high) that NAD distils by default.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from nad_jax.kernels import onednn
from nad_jax.models.preact_resnet import PreActResNet18
from nad_jax.models.resnet import ResNet18
from nad_jax.models.tiny import TinyNet
from nad_jax.models.vgg import VGG19BN
from nad_jax.models.wide_resnet import WideResNet

MODELS = {
    'wrn16_1': functools.partial(WideResNet, depth=16, widen_factor=1),
    'wrn16_2': functools.partial(WideResNet, depth=16, widen_factor=2),
    'wrn40_1': functools.partial(WideResNet, depth=40, widen_factor=1),
    'wrn40_2': functools.partial(WideResNet, depth=40, widen_factor=2),
    'preact_resnet18': PreActResNet18,
    'resnet18': ResNet18,  # torchvision's, as BackdoorBench builds it
    'vgg19_bn': VGG19BN,  # torchvision's, as BackdoorBench builds it
    'tiny': TinyNet,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Convolution implementations (`config.model.conv`): 'auto' picks oneDNN's on one CPU device
# where they build or load, else XLA's (nad_jax/kernels/onednn.py: resolve).
CONVS = ('auto', 'xla', 'onednn')


def build_model(name: str, num_classes: int, dtype: str = 'float32',
                conv: str = 'xla') -> nn.Module:
  """Returns the Flax module registered as `name`; KeyError names the choices.

  Every model takes (N, H, W, C) float images as scaled by `train.normalizer`
  (pixels / 255, then (x - mean) / std when config.model.mean/std are set) and
  returns float32 logits (N, num_classes). `conv` and `dtype` go through
  `onednn.resolve`: 'auto' is oneDNN's convolutions on one CPU device where they
  build, else XLA's (said once, in one line), and bfloat16 with oneDNN on a CPU
  without native bfloat16 convolutions computes in float32 (said once).

  Args:
    name: a key of MODELS (`config.model.name`).
    num_classes: the number of output logits.
    dtype: a key of DTYPES: the computation dtype (params and logits stay float32).
    conv: a member of CONVS (`config.model.conv`); the default 'xla' builds a plain model
      without touching the kernels.

  Returns:
    The unbound Flax module; its `dtype` and `conv` attributes say what runs.

  Raises:
    KeyError: an unknown name, dtype or conv.
    onednn.OnednnUnavailable: conv 'onednn' and oneDNN cannot run here (one-line reason).
  """
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  if dtype not in DTYPES:
    raise KeyError(f'unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}')
  if conv not in CONVS:
    raise KeyError(f'unknown conv {conv!r}; choose one of {CONVS}')
  conv, dtype = onednn.resolve(conv, dtype)
  conv_fn = onednn.conv_general_dilated if conv == 'onednn' else None
  return MODELS[name](num_classes=num_classes, dtype=DTYPES[dtype], conv=conv_fn)


@functools.partial(jax.jit, static_argnums=(0, 2))
def initialize(model: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> dict:
  """`model.init` on one zero image of `image_shape`, as one compiled program.

  The same variables, bit for bit, as calling `model.init` eagerly, in a fraction of its
  time on a CPU: eagerly, XLA compiles every initialiser's random draw separately
  (WRN-16-1: 15 s against 11 s jitted, 2 CPU cores).

  Args:
    model: a Flax module of MODELS (hashable: it is a static argument).
    key: the PRNG key of the draws.
    image_shape: (H, W, C) of one input image, a tuple.

  Returns:
    {'params', 'batch_stats'} (float32), as `model.init(key, x, train=False)` returns them.
  """
  return model.init(key, jnp.zeros((1, *image_shape)), train=False)
