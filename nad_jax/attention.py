"""Attention maps and the attention-distillation (AT) loss of NAD.

Attention transfer follows Zagoruyko & Komodakis, ICLR 2017; NAD (Li et al.,
ICLR 2021) uses it between a fine-tuned teacher and the backdoored student.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def attention_map(features: jax.Array, p: float = 2.0, eps: float = 1e-6) -> jax.Array:
  """Channel-pooled attention of NHWC features, L2-normalised per sample.

  A = sum_c |F_c|^p, flattened to (N, H*W) and divided by its L2 norm (+eps).
  The gradient stays finite where a sample's features are all zero (it is 0
  there, as with PyTorch's F.normalize).

  Args:
    features: (N, H, W, C) features, any float dtype.
    p: the exponent, > 0.
    eps: added to the norm.

  Returns:
    (N, H*W) float32 attention maps.
  """
  magnitude = jnp.abs(features.astype(jnp.float32))
  # Where-trick: the gradient of x**p at 0 is inf for p < 1, and 0 * inf is NaN.
  positive = magnitude > 0
  powered = jnp.where(positive, jnp.where(positive, magnitude, 1.0) ** p, 0.0)
  a = jnp.sum(powered, axis=-1)
  a = a.reshape(a.shape[0], -1)
  # The norm's gradient at 0 is NaN; same forward values as jnp.linalg.norm elsewhere.
  squares = jnp.sum(a * a, axis=1, keepdims=True)
  nonzero = squares > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
  return a / (norm + eps)


def at_loss(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
  """Mean squared difference of the two attention maps (mean over N*H*W).

  A = `attention_map`; the loss is mean((A_s - A_t)^2), as the official NAD
  code computes it (benchmarks/torch_reference.py), with no beta / 2 factor.

  Args:
    student: (N, H, W, C) features of the student, any float dtype.
    teacher: (N, H, W, C') features of the teacher; the same N, H, W.
    p: the attention exponent, > 0.

  Returns:
    float32 scalar.
  """
  return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def distillation_losses(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                        layers: Sequence[str], p: float) -> jax.Array:
  """AT loss per distilled layer, shape (len(layers),); the teacher gets no gradient.

  Args:
    student: {layer name: (N, H, W, C) features} of the student.
    teacher: the same layers of the teacher, same N, H, W.
    layers: the names to distil (keys of both mappings).
    p: the attention exponent, > 0.

  Returns:
    (len(layers),) float32, in `layers` order.
  """
  return jnp.stack([at_loss(student[name], jax.lax.stop_gradient(teacher[name]), p)
                    for name in layers])
