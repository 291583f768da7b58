"""oneDNN convolutions (model.conv='onednn') against XLA's: values, gradients, fallbacks, runs.

Skipped, with the reason, where oneDNN or a C++ compiler is missing
(pip install -e '.[onednn]' and g++).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nad_jax import models
from nad_jax.kernels import onednn

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(scope='module', autouse=True)
def built():
  try:
    onednn.load()
  except onednn.OnednnUnavailable as e:
    pytest.skip(str(e))


def values_and_grads(conv, x, w, strides, padding):
  y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding, dimension_numbers=DIMS), x, w)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
  return (y, *vjp(dy))


@pytest.mark.parametrize('batch, size, cin, cout, kernel, stride, padding', [
    (4, 32, 3, 16, 3, 1, ((1, 1), (1, 1))),   # WRN's first conv
    (4, 32, 16, 32, 3, 2, ((1, 1), (1, 1))),  # a stride-2 group entry
    (4, 16, 16, 32, 1, 2, 'VALID'),           # the 1x1 shortcut
    (3, 9, 8, 8, 3, 2, 'SAME'),               # odd size: asymmetric padding
    (2, 8, 8, 4, 3, 1, ((0, 2), (1, 0))),     # uneven explicit padding
    (2, 9, 4, 4, 3, 2, ((1, 0), (0, 1))),     # stride 2 leaving the last row unread
])
def test_conv_matches_xla(batch, size, cin, cout, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)) / kernel, jnp.float32)
  ours = values_and_grads(onednn.conv_general_dilated, x, w, (stride, stride), padding)
  xla = values_and_grads(lax.conv_general_dilated, x, w, (stride, stride), padding)
  for name, a, b in zip(('output', 'input grad', 'kernel grad'), ours, xla):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))),
                               err_msg=name)


def test_unsupported_convs_fall_back_to_xla():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.bfloat16)
  same = lambda conv, **kw: conv(x, w, (1, 1), 'SAME', dimension_numbers=DIMS, **kw)
  np.testing.assert_array_equal(same(onednn.conv_general_dilated),
                                same(lax.conv_general_dilated))
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(same(onednn.conv_general_dilated, rhs_dilation=(2, 2)),
                                same(lax.conv_general_dilated, rhs_dilation=(2, 2)))
  lowered = jax.jit(lambda a, b: onednn.conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=DIMS)).lower(x, w).as_text()
  assert onednn.FORWARD in lowered  # float32 NHWC does go to oneDNN


def test_wrn_logits_and_training_gradients_match_xla():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
  xla, ours = (models.build_model('wrn16_1', 10, conv=c) for c in ('xla', 'onednn'))
  variables = xla.init(jax.random.key(0), x, train=False)
  np.testing.assert_allclose(ours.apply(variables, x), xla.apply(variables, x), atol=1e-5)

  def grads(model):
    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'])
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    return jax.jit(jax.grad(loss))(variables['params'])
  first, again, reference = grads(ours), grads(ours), grads(xla)
  for a, b, r in zip(jax.tree.leaves(first), jax.tree.leaves(again), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)  # deterministic
    np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_pipeline_is_deterministic_with_onednn(tmp_path):
  """The tiny pipeline on one CPU device with oneDNN convolutions: twice, same numbers."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  results = []
  for run in ('a', 'b'):
    subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py',
                    f'--workdir={tmp_path / run}', '--config.model.conv=onednn'],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with open(tmp_path / run / 'results.json') as f:
      results.append(json.load(f))
  assert results[0]['stages'] == results[1]['stages']
  assert results[0]['history'] == results[1]['history']
  assert results[0]['stages']['backdoored']['asr'] > 0
