"""A three-group pre-activation CNN, small enough for fast tests."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nad_jax.models.wide_resnet import WideBasicBlock, conv3x3


class TinyNet(nn.Module):
  """conv1, three WideBasicBlocks (strides 1, 2, 2), BN-ReLU, average pool, fc.

  For tests and surrogates; no paper or checkpoint layout.

  Input: (N, H, W, C) float images after `train.normalizer`: pixels / 255 in
  [0, 1], then (x - mean) / std per channel when config.model.mean/std are set.
  Cast to `dtype` inside. Sows into 'intermediates' each block's output, in
  `dtype`: 'group1' (N, H, W, width), 'group2' (N, H/2, W/2, 2 width),
  'group3' (N, H/4, W/4, 4 width) (halvings round up); Flax stores each as a 1-tuple.

  Attributes:
    num_classes: the number of logits.
    width: channels of conv1 and the first block.
    dtype: the computation dtype (float32 or bfloat16); params are float32.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
    distill_layers: the sown layers NAD distils by default.
  """
  num_classes: int = 10
  width: int = 8
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  distill_layers = ('group1', 'group2', 'group3')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Classifies a batch.

    Args:
      x: (N, H, W, C) float images, normalised as the class docstring says.
      train: batch statistics in BatchNorm (mutable 'batch_stats') if True.

    Returns:
      (N, num_classes) float32 logits.
    """
    x = conv3x3(self.width, 1, 'conv1', self.dtype, self.conv)(x.astype(self.dtype))
    for i, stride in enumerate((1, 2, 2), start=1):
      x = WideBasicBlock(self.width * 2 ** (i - 1), stride, self.dtype, self.conv,
                         name=f'block{i}')(x, train)
      self.sow('intermediates', f'group{i}', x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc', dtype=self.dtype)(x).astype(jnp.float32)
