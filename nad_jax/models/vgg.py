"""VGG-19 with BatchNorm exactly as torchvision builds it, which is BackdoorBench's `vgg19_bn`.

BackdoorBench (utils/aggregate_block/model_trainer_generate.py) builds
'vgg19_bn' as `torchvision.models.vgg19_bn(num_classes=num_classes)`:
torchvision's ImageNet network with only the last Linear resized. Its parts:

  features    16 3x3 convs (padding 1, with bias), each followed by BatchNorm
              and ReLU, in five blocks of 2, 2, 4, 4, 4 convs of 64, 128, 256,
              512, 512 channels, each block ending in a 2x2 max-pool (stride 2);
              torch indices features.0 .. features.52 (conv, bn, relu per conv,
              one index per pool).
  avgpool     AdaptiveAvgPool2d((7, 7)).
  classifier  Linear(512*7*7, 4096), ReLU, Dropout(0.5), Linear(4096, 4096),
              ReLU, Dropout(0.5), Linear(4096, num_classes) (classifier.0/3/6).

At 32x32 the five blocks run at 32, 16, 8, 4 and 2 pixels and the last pool
leaves 1x1, which the adaptive pool copies into a 7x7 grid of one value per
channel; classifier.0 still takes the 25088 flattened (C, 7, 7) values, so its
weights import unchanged. This module does the same (a general adaptive average
pool, flattened in PyTorch's channel-major order).

Flax names: `features_N` and `classifier_N` with torchvision's indices
(nad_jax/torch_io.py maps them to `features.N`, `classifier.N`).

Dropout: torchvision's classifier drops with p = 0.5 in training. Flax's dropout
needs a 'dropout' RNG, and nad-jax's training step (train.make_loss) calls
`model.apply` without rngs, so dropout is active only when `train` is True and
the caller passes `rngs={'dropout': key}`; in nad-jax's own training it is off.
Evaluation (train=False) is identical to torchvision's either way.

NAD layers: BackdoorBench's own NAD (defense/nad.py) distils one map for this
backbone, the output of `avgpool` (features + avgpool): at 32x32 a 7x7 map
that is constant over space, so its normalised attention is a constant and the
AT loss is zero. nad-jax instead distils maps with spatial extent: by default
the outputs of the last three blocks before their max-pool, 8x8, 4x4 and 2x2 at
32x32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nad_jax.models.wide_resnet import BatchNorm

# torchvision's cfgs['E']: convs per block and their channels.
BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) averaging weights of PyTorch's adaptive average pool along one axis.

  Output i averages inputs floor(i * size_in / size_out) .. ceil((i + 1) * size_in / size_out) - 1.
  """
  matrix = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d(size) on (N, H, W, C): (N, size[0], size[1], C) in x.dtype."""
  rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum('nhwc,ih,jw->nijc', x, rows, cols)


class VGG19BN(nn.Module):
  """VGG-19 with BatchNorm (Simonyan & Zisserman, ICLR 2015), torchvision's `vgg19_bn`.

  The layout of the module docstring (BackdoorBench's 'vgg19_bn').

  Input: (N, H, W, C) float images after `train.normalizer`: pixels / 255 in
  [0, 1], then (x - mean) / std per channel when config.model.mean/std are set.
  Cast to `dtype` inside. Sows into 'intermediates' each block's output before
  its max-pool (after the last ReLU), in `dtype`: 'group1' (N, H, W, 64),
  'group2' (N, H/2, W/2, 128), 'group3' (N, H/4, W/4, 256), 'group4'
  (N, H/8, W/8, 512), 'group5' (N, H/16, W/16, 512) (halvings round down): at
  32x32, 32x32, 16x16, 8x8, 4x4 and 2x2. Flax stores each as a 1-tuple.

  Attributes:
    num_classes: the number of logits.
    dtype: the computation dtype (float32 or bfloat16); params are float32.
    conv: a `lax.conv_general_dilated` replacement; None: XLA's.
    distill_layers: the sown layers NAD distils by default.
  """
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32
  conv: Any = None

  distill_layers = ('group3', 'group4', 'group5')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Classifies a batch.

    Args:
      x: (N, H, W, C) float images, normalised as the class docstring says.
      train: batch statistics in BatchNorm (mutable 'batch_stats') if True;
        also dropout in the classifier if the caller passes a 'dropout' RNG.

    Returns:
      (N, num_classes) float32 logits.
    """
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = x.astype(self.dtype)
    index = 0  # torchvision's index in `features`
    for group, (convs, width) in enumerate(BLOCKS, start=1):
      for _ in range(convs):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f'features_{index}',
                    dtype=self.dtype, conv_general_dilated=self.conv)(x)
        x = nn.relu(norm(name=f'features_{index + 1}')(x))
        index += 3  # conv, bn, relu
      self.sow('intermediates', f'group{group}', x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      index += 1  # the pool
    x = adaptive_avg_pool(x, (7, 7))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of (N, C, 7, 7)
    dropout = functools.partial(nn.Dropout, 0.5,
                                deterministic=not (train and self.has_rng('dropout')))
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    x = dropout()(nn.relu(dense(4096, name='classifier_0')(x)))
    x = dropout()(nn.relu(dense(4096, name='classifier_3')(x)))
    return dense(self.num_classes, name='classifier_6')(x).astype(jnp.float32)
