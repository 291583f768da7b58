"""PreAct-ResNet-18 in the layout of BackdoorBench's `models/preact_resnet.py`.

Names match that PyTorch model (`conv1`, `layer{1..4}.N.{bn1,conv1,bn2,conv2,shortcut.0}`,
`linear`). Its head has no BatchNorm before the average pool; `head_norm=True` adds
one (named `bn`) for the variant that has it.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nad_jax.models.wide_resnet import BatchNorm, conv3x3


class PreActBlock(nn.Module):
  """bn1-relu-conv1-bn2-relu-conv2 plus a shortcut (He et al. 2016, pre-activation).

  The shortcut is the input where shape is kept, else a 1x1 conv (`shortcut`)
  of the pre-activated input.

  Attributes:
    features: output channels.
    stride: the stride of conv1 and the shortcut.
    dtype: the computation dtype.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
  """
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # a lax.conv_general_dilated replacement; None: XLA's

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: (N, H, W, C) features.
      train: batch statistics in BatchNorm (mutable 'batch_stats') if True.

    Returns:
      (N, ceil(H / stride), ceil(W / stride), features) in `dtype`.
    """
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
  """PreAct-ResNet-18 (He et al., ECCV 2016), BackdoorBench layout.

  conv1 (64 channels, stride 1), four stages of two PreActBlocks of 64, 128,
  256, 512 channels (strides 1, 2, 2, 2), an optional BN-ReLU (`head_norm`), a
  global average pool and `linear`.

  Input: (N, H, W, C) float images after `train.normalizer`: pixels / 255 in
  [0, 1], then (x - mean) / std per channel when config.model.mean/std are set.
  Cast to `dtype` inside. Sows into 'intermediates' each stage's output, in
  `dtype`: 'group1' (N, H, W, 64), 'group2' (N, H/2, W/2, 128), 'group3'
  (N, H/4, W/4, 256), 'group4' (N, H/8, W/8, 512) (halvings round up); Flax
  stores each as a 1-tuple.

  Attributes:
    num_classes: the number of logits.
    head_norm: add a BatchNorm (`bn`) + ReLU before the pool.
    dtype: the computation dtype (float32 or bfloat16); params are float32.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
    distill_layers: the sown layers NAD distils by default.
  """
  num_classes: int = 10
  head_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  distill_layers = ('group2', 'group3', 'group4')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Classifies a batch.

    Args:
      x: (N, H, W, C) float images, normalised as the class docstring says.
      train: batch statistics in BatchNorm (mutable 'batch_stats') if True.

    Returns:
      (N, num_classes) float32 logits.
    """
    x = conv3x3(64, 1, 'conv1', self.dtype, self.conv)(x.astype(self.dtype))
    for i, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      x = PreActBlock(width, stride, self.dtype, self.conv, name=f'layer{i}_0')(x, train)
      x = PreActBlock(width, 1, self.dtype, self.conv, name=f'layer{i}_1')(x, train)
      self.sow('intermediates', f'group{i}', x)
    if self.head_norm:
      x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='linear', dtype=self.dtype)(x).astype(jnp.float32)
