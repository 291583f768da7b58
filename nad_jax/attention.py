"""Attention maps and the attention-distillation (AT) loss of NAD."""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def attention_map(features: jax.Array, p: float = 2.0, eps: float = 1e-6) -> jax.Array:
  """Channel-pooled attention of NHWC features, L2-normalised per sample.

  A = sum_c |F_c|^p, flattened to (N, H*W) and divided by its L2 norm (+eps).
  """
  a = jnp.sum(jnp.abs(features.astype(jnp.float32)) ** p, axis=-1)
  a = a.reshape(a.shape[0], -1)
  return a / (jnp.linalg.norm(a, axis=1, keepdims=True) + eps)


def at_loss(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
  """Mean squared difference of the two attention maps (mean over N*H*W)."""
  return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def distillation_losses(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                        layers: Sequence[str], p: float) -> jax.Array:
  """AT loss per distilled layer, shape (len(layers),); the teacher gets no gradient."""
  return jnp.stack([at_loss(student[name], jax.lax.stop_gradient(teacher[name]), p)
                    for name in layers])
