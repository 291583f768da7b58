"""oneDNN convolutions for XLA:CPU through the XLA FFI (`model.conv`: 'auto', the default, or 'onednn').

XLA:CPU's convolutions for 16-64 channels run 2-4x slower than oneDNN's, their
gradients most of all (benchmarks/README.md). `conv_general_dilated` is a drop-in
for `lax.conv_general_dilated` that runs NHWC/HWIO convolutions (any stride and
padding, no dilation or groups) and their gradients in oneDNN, in float32, or in
bfloat16 on CPUs that compute it natively (AVX512-BF16, AMX), and hands anything
else to XLA. `resolve` turns a config's (conv, dtype) into what runs here. The
kernels (onednn_conv.cc) are compiled with a C++ compiler on first use (~5 s)
against the pip packages of `pip install -e '.[onednn]'` and jax's FFI headers,
into a cache folder ($NAD_JAX_CACHE, default ~/.cache/nad_jax); later processes
load the cached library. To build it ahead of time (e.g. in a container image
that has a compiler) and see what 'auto' picks:
`python -c "from nad_jax.kernels import onednn; print(onednn.load(), onednn.resolve('auto'))"`.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv.cc')
FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS = (
    'NadOnednnConvForward', 'NadOnednnConvBackwardData', 'NadOnednnConvBackwardWeights')
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                out_spec=(0, 3, 1, 2))


class OnednnUnavailable(RuntimeError):
  """oneDNN's convolutions cannot run here; the one-line message says why."""


def _first_error(stderr: str) -> str:
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if 'error' in line]
  return (errors or lines or ['no compiler output'])[0]


@functools.cache
def load() -> str:
  """Builds the kernels once per source, jax version and environment; registers them.

  Cached: the build and registration run once per process; a failure is not
  cached, so a later call tries again.

  Returns:
    The path of the loaded library.

  Raises:
    OnednnUnavailable: no oneDNN headers under sys.prefix, no C++ compiler, or
      the build failed (the message holds the compiler's first error).
  """
  include, lib = os.path.join(sys.prefix, 'include'), os.path.join(sys.prefix, 'lib')
  if not os.path.exists(os.path.join(include, 'oneapi', 'dnnl', 'dnnl.hpp')):
    raise OnednnUnavailable(f'oneDNN headers are not in {include}: '
                            "pip install -e '.[onednn]' (onednn-devel-cpu-gomp)")
  compiler = shutil.which(os.environ.get('CXX', 'g++'))
  if compiler is None:
    raise OnednnUnavailable('no C++ compiler to build the oneDNN kernels (set CXX or install g++)')
  with open(SOURCE, 'rb') as f:
    digest = hashlib.sha256(f.read() + f'{jax.__version__} {sys.prefix}'.encode()).hexdigest()
  cache = os.environ.get('NAD_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache',
                                                       'nad_jax'))
  path = os.path.join(cache, f'onednn_conv_{digest[:16]}.so')
  if not os.path.exists(path):
    os.makedirs(cache, exist_ok=True)
    partial = f'{path}.{os.getpid()}.tmp'
    command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
               '-I', jax.ffi.include_dir(), '-I', include, SOURCE,
               '-L', lib, '-ldnnl', f'-Wl,-rpath,{lib}', '-o', partial]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    if built.returncode:
      raise OnednnUnavailable(f'building {SOURCE} with {compiler} failed: '
                              f'{_first_error(built.stderr)}')
    os.replace(partial, path)  # whole or absent, also with concurrent builds
  library = ctypes.cdll.LoadLibrary(path)
  for name in (FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return path


@functools.cache
def has_bf16() -> bool:
  """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16, AMX).

  Returns:
    True where oneDNN's effective ISA computes bfloat16 natively (plain AVX-512
    only emulates it; `ONEDNN_MAX_CPU_ISA` caps the ISA) and oneDNN picks an
    optimised, not reference, implementation of the forward pass and both gradients.

  Raises:
    OnednnUnavailable: the kernels cannot be built (see `load`).
  """
  return bool(ctypes.cdll.LoadLibrary(load()).NadOnednnHasBf16())


@functools.cache
def unavailable() -> str | None:
  """Why oneDNN's convolutions cannot run in this process, or None where they can.

  Cached per process: the backend, the device count and the build do not change.

  Returns:
    None, or a one-line reason: another backend, several devices, or `load`'s error.
  """
  backend = jax.default_backend()
  if backend != 'cpu':
    return f'the backend is {backend}, oneDNN runs on CPU'
  if jax.device_count() > 1:
    return f'{jax.device_count()} devices, oneDNN runs on one CPU device'
  try:
    load()
  except OnednnUnavailable as e:
    return str(e)
  return None


@functools.cache
def note(message: str) -> None:
  """Prints `message` once per process (on process 0)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def resolve(conv: str, dtype: str = 'float32') -> tuple[str, str]:
  """What runs here for `model.conv` and `model.dtype`: ('xla' | 'onednn', dtype).

  'auto' is oneDNN where it can run (one CPU device, the kernels built or
  loaded), else XLA, saying once in one line why. On the oneDNN path, bfloat16
  on a CPU without native bfloat16 convolutions computes in float32, saying so
  once. 'xla' stays XLA in any dtype.

  Args:
    conv: 'auto', 'xla' or 'onednn' (`config.model.conv`).
    dtype: 'float32' or 'bfloat16' (`config.model.dtype`).

  Returns:
    (conv, dtype): the convolutions and the computation dtype to build the model with.

  Raises:
    OnednnUnavailable: conv is 'onednn' and oneDNN cannot run here; the message says why.
  """
  if conv == 'xla':
    return conv, dtype
  reason = unavailable()
  if reason is not None:
    if conv == 'onednn':
      raise OnednnUnavailable(reason)
    note(f"model.conv 'auto': XLA's convolutions ({reason})")
    return 'xla', dtype
  if dtype == 'bfloat16' and not has_bf16():
    note("model.dtype 'bfloat16': this CPU has no native bfloat16 convolutions "
         '(AVX512-BF16 or AMX); computing in float32')
    return 'onednn', 'float32'
  return 'onednn', dtype


def _attributes(strides, pads) -> dict:
  (top, bottom), (left, right) = pads
  return {name: np.int64(value) for name, value in dict(
      sh=strides[0], sw=strides[1], pt=top, pb=bottom, pl=left, pr=right).items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  height, width = ((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
                   in zip(x.shape[1:3], pads, w.shape[:2], strides))
  out = jax.ShapeDtypeStruct((x.shape[0], height, width, w.shape[3]), x.dtype)
  # Stacked replicas (config.seeds) call the kernel once per replica.
  return jax.ffi.ffi_call(FORWARD, out, vmap_method='sequential')(
      x, w, **_attributes(strides, pads))


def _conv_forward(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _conv_backward(strides, pads, saved, dy):
  x, w = saved
  attributes = _attributes(strides, pads)
  dx = jax.ffi.ffi_call(BACKWARD_DATA, jax.ShapeDtypeStruct(x.shape, x.dtype),
                        vmap_method='sequential')(dy, w, **attributes)
  dw = jax.ffi.ffi_call(BACKWARD_WEIGHTS, jax.ShapeDtypeStruct(w.shape, w.dtype),
                        vmap_method='sequential')(x, dy, **attributes)
  return dx, dw


_conv.defvjp(_conv_forward, _conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """lax.conv_general_dilated, in oneDNN where it can be (see the module docstring).

  Same arguments and result as `lax.conv_general_dilated`. oneDNN runs it (with
  a custom VJP whose gradients also run in oneDNN) when `dimension_numbers` give
  a 4-D NHWC input, HWIO kernel and NHWC output (what Flax's nn.Conv passes),
  both operands float32, or both bfloat16 where `has_bf16()`, with no dilation,
  one feature and batch group, preferred_element_type None or the operands'
  dtype, and non-negative padding; anything else goes to XLA. `precision` is
  ignored on the oneDNN path (bfloat16 products accumulate in float32 there).

  Args:
    lhs: the input, e.g. (N, H, W, C_in).
    rhs: the kernel, e.g. (KH, KW, C_in, C_out).
    window_strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type: as in lax.

  Returns:
    The convolution, (N, H', W', C_out) in the operands' dtype on the oneDNN path.

  Raises:
    OnednnUnavailable: the oneDNN path was chosen and the kernels cannot be built.
  """
  xla = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type)
  if lhs.ndim != 4 or lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                 dimension_numbers) != NHWC:
    return xla()
  dtype = lhs.dtype
  supported = dtype == jnp.float32 or (dtype == jnp.bfloat16 and has_bf16())
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if (not supported or rhs.dtype != dtype or not undilated
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type not in (None, dtype)):
    return xla()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(p) for p in pads) < 0:
    return xla()
  load()
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)

