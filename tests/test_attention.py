"""Attention maps and AT loss against NumPy, and the AT term's effect on training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nad_jax import models, train
from nad_jax.attention import at_loss, attention_map, distillation_losses


def numpy_attention(features, p):
  a = (np.abs(features.astype(np.float64)) ** p).sum(axis=-1).reshape(len(features), -1)
  return a / (np.sqrt((a ** 2).sum(axis=1, keepdims=True)) + 1e-6)


def test_attention_map_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 8, 8, 16)).astype(np.float32)
  t = rng.normal(size=(4, 8, 8, 16)).astype(np.float32)
  for p in (1.0, 2.0, 4.0):
    np.testing.assert_allclose(attention_map(jnp.asarray(s), p), numpy_attention(s, p),
                               rtol=1e-5, atol=1e-7)
    expected = np.mean((numpy_attention(s, p) - numpy_attention(t, p)) ** 2)
    np.testing.assert_allclose(at_loss(jnp.asarray(s), jnp.asarray(t), p), expected, rtol=1e-5)


def test_teacher_gets_no_gradient_and_student_does():
  s = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  t = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  loss = lambda s, t: distillation_losses({'a': s}, {'a': t}, ('a',), 2.0).sum()
  grad_s, grad_t = jax.grad(loss, argnums=(0, 1))(s, t)
  assert float(jnp.abs(grad_s).max()) > 0
  assert float(jnp.abs(grad_t).max()) == 0


def one_epoch(betas, teacher_key=1):
  """One training epoch of the tiny net against a differently initialised teacher."""
  model = models.build_model('tiny', 10)
  mesh = train.make_mesh(1)
  tx = optax.sgd(0.1)
  state = train.init_state(model, tx, jax.random.key(0), (32, 32, 3))
  teacher = model.init(jax.random.key(teacher_key), jnp.zeros((1, 32, 32, 3)), train=False)
  recipe = train.Recipe(batch_size=16, betas=betas, layers=model.distill_layers)
  epoch = train.TrainEpoch(model, tx, mesh, recipe, train.normalizer(None, None), None)
  images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(32, dtype=np.int32) % 10
  return epoch(state, teacher, images, labels, np.zeros(32, bool), jax.random.key(2))


def test_at_term_changes_the_students_update():
  plain, _ = one_epoch((0.0, 0.0, 0.0))
  distilled, metrics = one_epoch((500.0, 1000.0, 1000.0))
  assert np.all(np.asarray(metrics['at']) > 0)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), plain.params, distilled.params)
  assert max(jax.tree.leaves(diff)) > 1e-4
