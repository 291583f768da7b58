"""oneDNN convolutions (model.conv 'auto' / 'onednn') against XLA's: values, gradients,
bfloat16, what 'auto' resolves to, fallbacks, whole runs.

The kernel tests skip, with the reason, where oneDNN or a C++ compiler is missing
(pip install -e '.[onednn]' and g++); the bfloat16 ones where the CPU has no native
bfloat16 convolutions. In-process tests run on the tests' 4 forced devices (where 'auto'
is XLA) and call the kernels directly; subprocesses check one device.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(scope='module')
def built():
  try:
    onednn.load()
  except onednn.OnednnUnavailable as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def bf16(built):  # pylint: disable=redefined-outer-name,unused-argument
  if not onednn.has_bf16():
    pytest.skip('this CPU has no native bfloat16 convolutions in oneDNN (AVX512-BF16, AMX)')


def onednn_model(name, dtype=jnp.float32):
  """The registered model with oneDNN's convolutions, past resolve (4 devices here)."""
  return models.MODELS[name](num_classes=10, dtype=dtype, conv=onednn.conv_general_dilated)


def one_device(code: str, **env) -> subprocess.CompletedProcess:
  """Runs Python `code` in a subprocess on one CPU device; returns it, text captured."""
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
                                 **env), check=False, timeout=300)


def values_and_grads(conv, x, w, strides, padding):
  y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding, dimension_numbers=DIMS), x, w)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), x.dtype)
  return (y, *vjp(dy))


GEOMETRIES = [
    (4, 32, 3, 16, 3, 1, ((1, 1), (1, 1))),   # WRN's first conv
    (4, 32, 16, 32, 3, 2, ((1, 1), (1, 1))),  # a stride-2 group entry
    (4, 16, 16, 32, 1, 2, 'VALID'),           # the 1x1 shortcut
    (3, 9, 8, 8, 3, 2, 'SAME'),               # odd size: asymmetric padding
    (2, 8, 8, 4, 3, 1, ((0, 2), (1, 0))),     # uneven explicit padding
    (2, 9, 4, 4, 3, 2, ((1, 0), (0, 1))),     # stride 2 leaving the last row unread
]


def operands(batch, size, cin, cout, kernel, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), dtype)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)) / kernel, dtype)
  return x, w


@pytest.mark.usefixtures('built')
@pytest.mark.parametrize('batch, size, cin, cout, kernel, stride, padding', GEOMETRIES)
def test_conv_matches_xla(batch, size, cin, cout, kernel, stride, padding):
  x, w = operands(batch, size, cin, cout, kernel, jnp.float32)
  ours = values_and_grads(onednn.conv_general_dilated, x, w, (stride, stride), padding)
  xla = values_and_grads(lax.conv_general_dilated, x, w, (stride, stride), padding)
  for name, a, b in zip(('output', 'input grad', 'kernel grad'), ours, xla):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))),
                               err_msg=name)


@pytest.mark.usefixtures('bf16')
@pytest.mark.parametrize('batch, size, cin, cout, kernel, stride, padding', GEOMETRIES)
def test_bf16_conv_matches_xla_within_bf16_rounding(batch, size, cin, cout, kernel, stride,
                                                     padding):
  """bf16 in oneDNN against float32 XLA on the same bf16 operands: bf16 output rounding."""
  x, w = operands(batch, size, cin, cout, kernel, jnp.bfloat16)
  ours = values_and_grads(onednn.conv_general_dilated, x, w, (stride, stride), padding)
  assert all(a.dtype == jnp.bfloat16 for a in ours)
  # The float32 reference gets the same bf16 output gradient as ours.
  y, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(
      a, b, (stride, stride), padding, dimension_numbers=DIMS),
                   x.astype(jnp.float32), w.astype(jnp.float32))
  dy = np.random.default_rng(1).standard_normal(y.shape)
  reference = (y, *vjp(jnp.asarray(jnp.asarray(dy, jnp.bfloat16), jnp.float32)))
  for name, a, b in zip(('output', 'input grad', 'kernel grad'), ours, reference):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                               atol=1e-2 * float(jnp.max(jnp.abs(b))), err_msg=name)


@pytest.mark.usefixtures('built')
def test_unsupported_convs_fall_back_to_xla():
  x, w = operands(2, 8, 4, 4, 3, jnp.float16)
  same = lambda conv, a, b, **kw: conv(a, b, (1, 1), 'SAME', dimension_numbers=DIMS, **kw)
  np.testing.assert_array_equal(same(onednn.conv_general_dilated, x, w),
                                same(lax.conv_general_dilated, x, w))
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(same(onednn.conv_general_dilated, x, w, rhs_dilation=(2, 2)),
                                same(lax.conv_general_dilated, x, w, rhs_dilation=(2, 2)))
  lowered = {dtype: jax.jit(lambda a, b: same(onednn.conv_general_dilated, a, b)).lower(
      x.astype(dtype), w.astype(dtype)).as_text() for dtype in (jnp.float32, jnp.bfloat16)}
  assert onednn.FORWARD in lowered[jnp.float32]  # float32 NHWC does go to oneDNN
  # bfloat16 goes to oneDNN exactly where the CPU computes it natively.
  assert (onednn.FORWARD in lowered[jnp.bfloat16]) == onednn.has_bf16()


def wrn_logits_and_grads(model, variables, x):
  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  return jax.jit(model.apply)(variables, x), jax.jit(jax.grad(loss))(variables['params'])


@pytest.mark.usefixtures('built')
def test_wrn_logits_and_training_gradients_match_xla():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
  xla = models.build_model('wrn16_1', 10, conv='xla')
  variables = xla.init(jax.random.key(0), x, train=False)
  logits, first = wrn_logits_and_grads(onednn_model('wrn16_1'), variables, x)
  _, again = wrn_logits_and_grads(onednn_model('wrn16_1'), variables, x)
  reference_logits, reference = wrn_logits_and_grads(xla, variables, x)
  np.testing.assert_allclose(logits, reference_logits, atol=1e-5)
  for a, b, r in zip(jax.tree.leaves(first), jax.tree.leaves(again), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)  # deterministic
    np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(r))))


@pytest.mark.usefixtures('bf16')
def test_bf16_wrn_matches_xla_bf16():
  """WRN-16-1 in bf16 with oneDNN's convolutions: float32 logits and parameter gradients,
  as close to the float32 model's as XLA's bf16 model is, and the same twice."""
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
  xla = models.build_model('wrn16_1', 10, 'bfloat16', conv='xla')
  variables = xla.init(jax.random.key(0), x, train=False)
  logits, first = wrn_logits_and_grads(onednn_model('wrn16_1', jnp.bfloat16), variables, x)
  _, again = wrn_logits_and_grads(onednn_model('wrn16_1', jnp.bfloat16), variables, x)
  xla_logits, xla_grads = wrn_logits_and_grads(xla, variables, x)
  _, exact = wrn_logits_and_grads(models.build_model('wrn16_1', 10, 'float32', conv='xla'),
                                  variables, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, xla_logits, rtol=5e-2,
                             atol=5e-2 * float(jnp.max(jnp.abs(xla_logits))))
  error = lambda a, r: float(jnp.linalg.norm(a - r)) / (float(jnp.linalg.norm(r)) + 1e-12)
  for a, b, x_bf16, r in zip(*map(jax.tree.leaves, (first, again, xla_grads, exact))):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)  # deterministic
    # A random net's gradient in bf16 is far from float32's (XLA's: 20-50% per tensor on a
    # CPU with AMX), so the bound is XLA's own bf16 error; a wrong kernel gives ~100%.
    assert error(a, r) <= 1.5 * error(x_bf16, r) + 1e-6


def test_resolve_on_four_devices(capsys):
  """The tests' 4 forced devices: 'auto' is XLA, said once; 'onednn' is an error; 'xla' stays."""
  onednn.note.cache_clear()
  assert onednn.resolve('xla', 'bfloat16') == ('xla', 'bfloat16')
  assert onednn.resolve('auto', 'bfloat16') == ('xla', 'bfloat16')
  assert onednn.resolve('auto') == ('xla', 'float32')
  out = capsys.readouterr().out.splitlines()
  assert out == ["model.conv 'auto': XLA's convolutions (4 devices, oneDNN runs on one CPU device)"]
  with pytest.raises(onednn.OnednnUnavailable, match='4 devices'):
    onednn.resolve('onednn')
  model = models.build_model('wrn16_1', 10, 'bfloat16', 'auto')
  assert model.conv is None and model.dtype == jnp.bfloat16


@pytest.mark.usefixtures('built')
def test_auto_is_onednn_on_one_cpu_device():
  done = one_device(
      'import jax.numpy as jnp; from nad_jax import models; from nad_jax.kernels import onednn\n'
      "m = models.build_model('wrn16_1', 10, 'float32', 'auto')\n"
      "b = models.build_model('wrn16_1', 10, 'bfloat16', 'auto')\n"
      "print(m.conv is onednn.conv_general_dilated, b.conv is onednn.conv_general_dilated,\n"
      "      b.dtype == (jnp.bfloat16 if onednn.has_bf16() else jnp.float32))")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines[-1] == 'True True True'
  if not onednn.has_bf16():  # one line says bf16 computes in float32 here
    assert lines[:-1] == ["model.dtype 'bfloat16': this CPU has no native bfloat16 convolutions "
                          '(AVX512-BF16 or AMX); computing in float32']
  else:
    assert lines[:-1] == []


def test_auto_without_a_compiler_falls_back_in_one_line(tmp_path):
  """No compiler and nothing cached: 'auto' says so in one line and runs XLA's; 'onednn' is
  an error naming the compiler."""
  done = one_device(
      'from nad_jax import models; from nad_jax.kernels import onednn\n'
      "print(models.build_model('tiny', 10, 'float32', 'auto').conv is None)\n"
      "models.build_model('tiny', 10, 'float32', 'auto')\n"
      "models.build_model('tiny', 10, 'float32', 'onednn')",
      CXX=str(tmp_path / 'no-compiler'), NAD_JAX_CACHE=str(tmp_path / 'cache'))
  assert done.stdout.splitlines() == [
      "model.conv 'auto': XLA's convolutions (no C++ compiler to build the oneDNN kernels "
      '(set CXX or install g++))', 'True']
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      'nad_jax.kernels.onednn.OnednnUnavailable: no C++ compiler to build the oneDNN kernels '
      '(set CXX or install g++)')


@pytest.mark.slow
@pytest.mark.usefixtures('built')
def test_pipeline_is_deterministic_with_onednn(tmp_path):
  """The tiny pipeline on one CPU device with the default model.conv ('auto': oneDNN here):
  twice, same numbers."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  results = []
  for run in ('a', 'b'):
    done = subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py',
                           f'--workdir={tmp_path / run}'],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                          timeout=300)
    assert "model.conv 'auto'" not in done.stdout  # no fallback: oneDNN's convolutions ran
    with open(tmp_path / run / 'results.json') as f:
      results.append(json.load(f))
  assert results[0]['stages'] == results[1]['stages']
  assert results[0]['history'] == results[1]['history']
  assert len(results[0]['history']['nad']) > 1  # it trained (tiny.py's ASR is near chance)
