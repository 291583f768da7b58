"""Model registry: config names to Flax modules.

Every model sows the output of each of its residual groups into the
'intermediates' collection as 'group1', 'group2', ...; `distill_layers` names the
three (low, middle, high) that NAD distils by default.
"""

import functools

import jax.numpy as jnp

from nad_jax.kernels import onednn
from nad_jax.models.preact_resnet import PreActResNet18
from nad_jax.models.tiny import TinyNet
from nad_jax.models.wide_resnet import WideResNet

MODELS = {
    'wrn16_1': functools.partial(WideResNet, depth=16, widen_factor=1),
    'wrn16_2': functools.partial(WideResNet, depth=16, widen_factor=2),
    'wrn40_1': functools.partial(WideResNet, depth=40, widen_factor=1),
    'wrn40_2': functools.partial(WideResNet, depth=40, widen_factor=2),
    'preact_resnet18': PreActResNet18,
    'tiny': TinyNet,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Convolution implementations: XLA's own, or oneDNN's on CPU (nad_jax/kernels/onednn.py).
CONVS = ('xla', 'onednn')


def build_model(name: str, num_classes: int, dtype: str = 'float32', conv: str = 'xla'):
  """Returns the Flax module registered as `name`; KeyError names the choices."""
  if name not in MODELS:
    raise KeyError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  if dtype not in DTYPES:
    raise KeyError(f'unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}')
  if conv not in CONVS:
    raise KeyError(f'unknown conv {conv!r}; choose one of {CONVS}')
  conv_fn = onednn.conv_general_dilated if conv == 'onednn' else None
  return MODELS[name](num_classes=num_classes, dtype=DTYPES[dtype], conv=conv_fn)
