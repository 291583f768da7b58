"""Attention maps and AT loss against NumPy, and the AT term's effect on training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def features_with_a_zero_sample(seed=0):
  """(3, 4, 4, 5) float32 features whose sample 1 is all zeros."""
  f = np.random.default_rng(seed).normal(size=(3, 4, 4, 5)).astype(np.float32)
  f[1] = 0.0
  return f


def test_attention_forward_is_unchanged_by_the_safe_norm():
  # The former formula (jnp.linalg.norm); the zero sample maps to zeros in both.
  def reference(f, p, eps=1e-6):
    a = jnp.sum(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    return a / (jnp.linalg.norm(a, axis=1, keepdims=True) + eps)

  f = jnp.asarray(features_with_a_zero_sample())
  for p in (0.5, 1.0, 1.5, 2.0, 4.0):
    np.testing.assert_allclose(attention_map(f, p), reference(f, p), rtol=1e-6, atol=0)
  assert float(jnp.abs(attention_map(f)[1]).max()) == 0


def test_at_loss_gradient_is_finite_at_an_all_zero_sample():
  s = jnp.asarray(features_with_a_zero_sample(0))
  t = jnp.asarray(features_with_a_zero_sample(1))
  for p in (0.5, 1.0, 1.5, 2.0):
    grad = np.asarray(jax.grad(at_loss)(s, t, p))
    assert np.all(np.isfinite(grad)), p
    assert np.all(grad[1] == 0), p  # no direction moves an all-zero map's attention
    assert np.abs(grad[0]).max() > 0, p


def test_attention_matches_pytorch_nad_at_a_zero_sample():
  """Against the official NAD at(): F.normalize(fm.pow(p).mean(1).view(N, -1)); the
  channel mean there vs our sum is a constant factor that the normalisation removes."""
  torch = pytest.importorskip('torch')
  fn = torch.nn.functional
  s = features_with_a_zero_sample(0)
  t = features_with_a_zero_sample(1)
  p = 2.0
  at = lambda fm: fn.normalize(fm.pow(p).mean(1).view(fm.size(0), -1))
  s_torch = torch.tensor(s.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
  t_torch = torch.tensor(t.transpose(0, 3, 1, 2), dtype=torch.float64)
  (at(s_torch) - at(t_torch)).pow(2).mean().backward()
  grad_torch = s_torch.grad.numpy().transpose(0, 2, 3, 1)

  np.testing.assert_allclose(attention_map(jnp.asarray(s), p),
                             at(s_torch).detach().numpy(), rtol=1e-5, atol=1e-7)
  grad = np.asarray(jax.grad(at_loss)(jnp.asarray(s), jnp.asarray(t), p))
  assert np.all(np.isfinite(grad)) and np.all(np.isfinite(grad_torch))
  np.testing.assert_allclose(grad, grad_torch, rtol=1e-4, atol=1e-7)


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
  teacher = models.initialize(model, jax.random.key(teacher_key), (32, 32, 3))
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
