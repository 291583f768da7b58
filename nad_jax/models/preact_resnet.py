"""PreAct-ResNet-18 in the layout of BackdoorBench's `models/preact_resnet.py`.

Names match that PyTorch model (`conv1`, `layer{1..4}.N.{bn1,conv1,bn2,conv2,shortcut.0}`,
`linear`). Its head has no BatchNorm before the average pool; `head_norm=True` adds
one (named `bn`) for the variant that has it.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nad_jax.models.wide_resnet import BatchNorm, conv3x3


class PreActBlock(nn.Module):
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # a lax.conv_general_dilated replacement; None: XLA's

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    pre = nn.relu(norm(name='bn1')(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride, padding='VALID',
                         use_bias=False, name='shortcut', dtype=self.dtype,
                         conv_general_dilated=self.conv)(pre)
    else:
      shortcut = x
    y = conv3x3(self.features, self.stride, 'conv1', self.dtype, self.conv)(pre)
    y = conv3x3(self.features, 1, 'conv2', self.dtype, self.conv)(nn.relu(norm(name='bn2')(y)))
    return shortcut + y


class PreActResNet18(nn.Module):
  num_classes: int = 10
  head_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  distill_layers = ('group2', 'group3', 'group4')

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv3x3(64, 1, 'conv1', self.dtype, self.conv)(x.astype(self.dtype))
    for i, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      x = PreActBlock(width, stride, self.dtype, self.conv, name=f'layer{i}_0')(x, train)
      x = PreActBlock(width, 1, self.dtype, self.conv, name=f'layer{i}_1')(x, train)
      self.sow('intermediates', f'group{i}', x)
    if self.head_norm:
      x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='linear', dtype=self.dtype)(x).astype(jnp.float32)
