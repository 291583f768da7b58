"""Where a training or NAD gradient's time goes on CPU: XLA's profiler, summed per HLO op kind.

  python benchmarks/profile_step.py [--conv auto|xla|onednn] [--dtype float32|bfloat16]
                                    [--batch 64] [--part nad|ce|eval]

Traces 5 calls of the jitted gradient (student forward + backward; for `nad` also the
frozen teacher's forward and the AT loss), or of the evaluation forward (`eval`), and
prints the time per op kind, e.g. `ffi_call` (oneDNN convolutions), `ynn_fusion`
(YNNPACK reductions), `*_fusion` (XLA element-wise).
One CPU device: --conv auto (the default, as model.conv) is oneDNN's where it builds.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import bench

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_cpu_enable_xprof_traceme=true').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax._src.lib import _profile_data  # pylint: disable=wrong-import-position

from nad_jax import data, models  # pylint: disable=wrong-import-position
from nad_jax import train as T  # pylint: disable=wrong-import-position

CALLS = 5


def gradient(model, part):
  """The jitted gradient of the loss the project trains with (train.make_loss), or for
  `eval` the evaluation forward (BatchNorm in inference mode)."""
  if part == 'eval':
    return jax.jit(lambda params, batch_stats, teacher, x, y, key: model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=False),
                   compiler_options=T.cpu_compiler_options(training=False))
  nad = part == 'nad'
  recipe = T.Recipe(batch_size=0, betas=(500.0, 1000.0, 1000.0) if nad else (),
                    layers=tuple(model.distill_layers) if nad else ())
  grad = jax.grad(T.make_loss(model, recipe), has_aux=True)
  return jax.jit(lambda *inputs: grad(*inputs)[0],
                 compiler_options=T.cpu_compiler_options(training=True))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--model', default='wrn16_1', choices=tuple(models.MODELS))
  p.add_argument('--conv', default='auto', choices=models.CONVS)
  p.add_argument('--dtype', default='float32', choices=sorted(models.DTYPES))
  p.add_argument('--batch', type=bench.positive_int, default=64)
  p.add_argument('--part', default='nad', choices=('nad', 'ce', 'eval'))
  args = p.parse_args()

  model = models.build_model(args.model, 10, args.dtype, args.conv)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  ds = data.synthetic(0, args.batch, 0)
  inputs = (variables['params'], variables['batch_stats'], variables,
            jnp.asarray(ds.train_images, jnp.float32) / 255, jnp.asarray(ds.train_labels),
            jax.random.key(0))
  grad = gradient(model, args.part)
  for _ in range(3):  # compile and warm up
    jax.block_until_ready(grad(*inputs))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(CALLS):
        jax.block_until_ready(grad(*inputs))
    trace = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
    profile = _profile_data.ProfileData.from_file(trace)

  per_kind = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        if name.startswith(('$', 'Pjit', 'ThunkExecutor')):  # Python frames, whole-call spans
          continue
        per_kind[re.sub(r'\.\d+$', '', name)] += event.duration_ns
  conv = 'xla' if model.conv is None else 'onednn'
  print(f'{args.model} {args.part} call, batch {args.batch}, conv {conv}, '
        f'dtype {jnp.dtype(model.dtype).name}: ms per call by op kind')
  for name, ns in per_kind.most_common(12):
    print(f'{ns / CALLS / 1e6:8.2f}  {name}')
  print(f'{sum(per_kind.values()) / CALLS / 1e6:8.2f}  total (concurrent ops overlap)')


if __name__ == '__main__':
  main()
