"""oneDNN convolutions for XLA:CPU through the XLA FFI (optional; `model.conv = 'onednn'`).

XLA:CPU's convolutions for 16-64 channels run 2-4x slower than oneDNN's, their
gradients most of all (benchmarks/README.md). `conv_general_dilated` is a drop-in
for `lax.conv_general_dilated` that runs NHWC/HWIO float32 convolutions (any
stride and padding, no dilation or groups) and their gradients in oneDNN, and
hands anything else to XLA. The kernels (onednn_conv.cc) are compiled on first
use against the pip packages of `pip install -e '.[onednn]'` and jax's FFI
headers, into a cache folder ($NAD_JAX_CACHE, default ~/.cache/nad_jax).
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
  """oneDNN or a C++ compiler is missing, or the kernels did not build; says which."""


@functools.cache
def load() -> None:
  """Builds the kernels once per source, jax version and environment; registers them.

  Cached: the build and registration run once per process; a failure is not
  cached, so a later call tries again.

  Raises:
    OnednnUnavailable: no oneDNN headers under sys.prefix, no C++ compiler, or
      the build failed (the message holds the compiler's stderr tail).
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
      raise OnednnUnavailable(f'building {SOURCE} failed:\n{built.stderr[-3000:]}')
    os.replace(partial, path)  # whole or absent, also with concurrent builds
  library = ctypes.cdll.LoadLibrary(path)
  for name in (FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')


def _attributes(strides, pads) -> dict:
  (top, bottom), (left, right) = pads
  return {name: np.int64(value) for name, value in dict(
      sh=strides[0], sw=strides[1], pt=top, pb=bottom, pl=left, pr=right).items()}


def _float32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
  height, width = ((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
                   in zip(x.shape[1:3], pads, w.shape[:2], strides))
  out = _float32((x.shape[0], height, width, w.shape[3]))
  return jax.ffi.ffi_call(FORWARD, out)(x, w, **_attributes(strides, pads))


def _conv_forward(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _conv_backward(strides, pads, saved, dy):
  x, w = saved
  attributes = _attributes(strides, pads)
  dx = jax.ffi.ffi_call(BACKWARD_DATA, _float32(x.shape))(dy, w, **attributes)
  dw = jax.ffi.ffi_call(BACKWARD_WEIGHTS, _float32(w.shape))(x, dy, **attributes)
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
  both operands float32, with no dilation, one feature and batch group,
  preferred_element_type None or float32, and non-negative padding; anything
  else goes to XLA. `precision` is ignored on the oneDNN path.

  Args:
    lhs: the input, e.g. (N, H, W, C_in).
    rhs: the kernel, e.g. (KH, KW, C_in, C_out).
    window_strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type: as in lax.

  Returns:
    The convolution, (N, H', W', C_out) float32 on the oneDNN path.

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
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if (lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or not undilated
      or feature_group_count != 1 or batch_group_count != 1
      or preferred_element_type not in (None, jnp.float32)):
    return xla()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(p) for p in pads) < 0:
    return xla()
  load()
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
