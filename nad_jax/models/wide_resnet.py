"""WideResNet-d-k in the pre-activation layout of the common PyTorch WideResNet.

Submodule names follow the PyTorch checkpoints of the NAD authors
(`conv1`, `block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`)
so that weights map one to one. The outputs of the three groups are sown into
the 'intermediates' collection; they are what attention distillation aligns.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm defaults: momentum 0.1 (Flax's 0.9), eps 1e-5.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv3x3(features: int, stride: int, name: str, dtype: Any, conv: Any = None) -> nn.Conv:
  """A 3x3 convolution without bias, padded by 1 on every side (as PyTorch's padding=1).

  Args:
    features: output channels.
    stride: the stride of both spatial axes.
    name: the submodule name (matches the PyTorch checkpoint).
    dtype: the computation dtype.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.

  Returns:
    The nn.Conv; on (N, H, W, C_in) it gives (N, ceil(H / stride), ceil(W / stride), features).
  """
  # Explicit symmetric padding: 'SAME' pads stride-2 convs asymmetrically, unlike PyTorch.
  return nn.Conv(features, (3, 3), strides=stride, padding=((1, 1), (1, 1)),
                 use_bias=False, name=name, dtype=dtype, conv_general_dilated=conv)


class WideBasicBlock(nn.Module):
  """bn1-relu-conv1-bn2-relu-conv2 plus an identity or 1x1-conv shortcut."""
  features: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # a lax.conv_general_dilated replacement; None: XLA's

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: (N, H, W, C) features.
      train: BatchNorm uses batch statistics and updates 'batch_stats' if True,
        running averages if False.

    Returns:
      (N, ceil(H / stride), ceil(W / stride), features) in `dtype`.
    """
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    pre = nn.relu(norm(name='bn1')(x))
    same_shape = x.shape[-1] == self.features and self.stride == 1
    # As in the PyTorch original: a changed shape takes the shortcut from the
    # pre-activated input, an unchanged one from the raw input.
    shortcut = x if same_shape else nn.Conv(
        self.features, (1, 1), strides=self.stride, padding='VALID',
        use_bias=False, name='convShortcut', dtype=self.dtype,
        conv_general_dilated=self.conv)(pre)
    y = conv3x3(self.features, self.stride, 'conv1', self.dtype, self.conv)(pre)
    y = nn.relu(norm(name='bn2')(y))
    y = conv3x3(self.features, 1, 'conv2', self.dtype, self.conv)(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WideResNet-depth-widen_factor (Zagoruyko & Komodakis, BMVC 2016), xternalz layout.

  The layout of xternalz/WideResNet-pytorch (the NAD authors' models), without
  dropout: conv1 (16 channels), three groups of (depth - 4) / 6 WideBasicBlocks
  of 16k, 32k, 64k channels (k = widen_factor; strides 1, 2, 2), then bn1-ReLU,
  a global average pool and fc.

  Input: (N, H, W, C) float images after `train.normalizer`: pixels / 255 in
  [0, 1], then (x - mean) / std per channel when config.model.mean/std are set
  (the NAD authors' models: unnormalised [0, 1]). Cast to `dtype` inside.
  Sows into 'intermediates' each group's output (before the next BN-ReLU), in
  `dtype`: 'group1' (N, H, W, 16k), 'group2' (N, H/2, W/2, 32k), 'group3'
  (N, H/4, W/4, 64k) (halvings round up); Flax stores each as a 1-tuple.

  Attributes:
    depth: 6n + 4 (16 and 40 in MODELS).
    widen_factor: k, the width multiplier.
    num_classes: the number of logits.
    dtype: the computation dtype (float32 or bfloat16); params are float32.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
    distill_layers: the sown layers NAD distils by default.
  """
  depth: int = 16
  widen_factor: int = 1
  num_classes: int = 10
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

    Raises:
      ValueError: depth is not 6n + 4.
    """
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n+4, got {self.depth}')
    blocks_per_group = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = conv3x3(16, 1, 'conv1', self.dtype, self.conv)(x.astype(self.dtype))
    for group, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      x = WideResNetGroup(width, stride, blocks_per_group, self.dtype, self.conv,
                          name=f'block{group}')(x, train)
      self.sow('intermediates', f'group{group}', x)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn1')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc', dtype=self.dtype)(x).astype(jnp.float32)


class WideResNetGroup(nn.Module):
  """`num_blocks` WideBasicBlocks (torch: `block{i}.layer`); only the first strides.

  Attributes:
    features: output channels of every block.
    stride: the first block's stride.
    num_blocks: the number of blocks.
    dtype: the computation dtype.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
  """
  features: int
  stride: int
  num_blocks: int
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the blocks.

    Args:
      x: (N, H, W, C) features.
      train: batch statistics in BatchNorm if True.

    Returns:
      (N, ceil(H / stride), ceil(W / stride), features) in `dtype`.
    """
    for i in range(self.num_blocks):
      x = WideBasicBlock(self.features, self.stride if i == 0 else 1, self.dtype, self.conv,
                         name=f'layer_{i}')(x, train)
    return x
