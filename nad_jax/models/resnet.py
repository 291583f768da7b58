"""ResNet-18 exactly as torchvision builds it, which is BackdoorBench's `resnet18`.

BackdoorBench (utils/aggregate_block/model_trainer_generate.py) builds 'resnet18'
as `torchvision.models.resnet.resnet18(num_classes=num_classes)`: torchvision's
ImageNet network unchanged, whatever the image size. So at 32x32 the stem
(7x7 conv, stride 2, padding 3, then a 3x3 max-pool, stride 2, padding 1)
leaves 8x8 maps, and layer1..layer4 give 8x8, 4x4, 2x2 and 1x1. This module
keeps that stem (it is not the CIFAR variant with a 3x3 stem) so that
BackdoorBench's PyTorch checkpoints import one to one.

Names match torchvision's state_dict (`conv1`, `bn1`,
`layer{1..4}.N.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}`, `fc`); Flax
spells `layer1.0` as `layer1_0` and `downsample.0/1` as `downsample_0/1`
(nad_jax/torch_io.py maps them).

NAD layers: BackdoorBench's own NAD (defense/nad.py) distils one map for this
backbone, the output of `avgpool` (everything but `fc`), a (N, 512, 1, 1) map
whose normalised attention is a constant, so its AT loss is always zero.
nad-jax instead distils maps with spatial extent: by default layer1, layer2 and
layer3 (8x8, 4x4, 2x2 at 32x32); layer4 is sown too but is 1x1 at 32x32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nad_jax.models.wide_resnet import BatchNorm, conv3x3


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: conv1-bn1-relu-conv2-bn2, plus the shortcut, then relu.

  The shortcut is the input where shape is kept, else `downsample`: a 1x1 conv
  with the block's stride (`downsample_0`) and a BatchNorm (`downsample_1`).

  Attributes:
    features: output channels.
    stride: the stride of conv1 and the downsample conv.
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
    y = nn.relu(norm(name='bn1')(conv3x3(self.features, self.stride, 'conv1', self.dtype,
                                         self.conv)(x)))
    y = norm(name='bn2')(conv3x3(self.features, 1, 'conv2', self.dtype, self.conv)(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=self.stride, padding='VALID', use_bias=False,
                  name='downsample_0', dtype=self.dtype, conv_general_dilated=self.conv)(x)
      x = norm(name='downsample_1')(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 (He et al., CVPR 2016), torchvision's `resnet18` (BackdoorBench's 'resnet18').

  conv1 (7x7, 64 channels, stride 2, padding 3, no bias), bn1, ReLU, a 3x3
  max-pool (stride 2, padding 1), four stages of two BasicBlocks of 64, 128,
  256, 512 channels (strides 1, 2, 2, 2), a global average pool and `fc`.

  Input: (N, H, W, C) float images after `train.normalizer`: pixels / 255 in
  [0, 1], then (x - mean) / std per channel when config.model.mean/std are set.
  Cast to `dtype` inside. Sows into 'intermediates' each stage's output (after
  its last ReLU), in `dtype`: 'group1' (N, H/4, W/4, 64), 'group2'
  (N, H/8, W/8, 128), 'group3' (N, H/16, W/16, 256), 'group4'
  (N, H/32, W/32, 512) (halvings round up): at 32x32, 8x8, 4x4, 2x2 and 1x1.
  Flax stores each as a 1-tuple. `distill_layers` skips 'group4', whose
  attention map is a constant at 32x32 (see the module docstring).

  Attributes:
    num_classes: the number of logits.
    dtype: the computation dtype (float32 or bfloat16); params are float32.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
    distill_layers: the sown layers NAD distils by default.
  """
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
    """
    x = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, name='conv1',
                dtype=self.dtype, conv_general_dilated=self.conv)(x.astype(self.dtype))
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name='bn1')(x))
    # PyTorch's MaxPool2d pads with -inf, as Flax's max_pool does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      x = BasicBlock(width, stride, self.dtype, self.conv, name=f'layer{i}_0')(x, train)
      x = BasicBlock(width, 1, self.dtype, self.conv, name=f'layer{i}_1')(x, train)
      self.sow('intermediates', f'group{i}', x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='fc', dtype=self.dtype)(x).astype(jnp.float32)
