"""A three-group pre-activation CNN, small enough for fast tests."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from nad_jax.models.wide_resnet import WideBasicBlock, conv3x3


class TinyNet(nn.Module):
  num_classes: int = 10
  width: int = 8
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  distill_layers = ('group1', 'group2', 'group3')

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv3x3(self.width, 1, 'conv1', self.dtype, self.conv)(x.astype(self.dtype))
    for i, stride in enumerate((1, 2, 2), start=1):
      x = WideBasicBlock(self.width * 2 ** (i - 1), stride, self.dtype, self.conv,
                         name=f'block{i}')(x, train)
      self.sow('intermediates', f'group{i}', x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc', dtype=self.dtype)(x).astype(jnp.float32)
