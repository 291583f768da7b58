"""XLA's convolutions against oneDNN's (model.conv='onednn'), alone and inside WRN-16-1.

Best of 10 after a warm-up, milliseconds, batch 128 on one CPU device:
one 3x3 conv per WRN-16-1 shape (forward; forward + both gradients), then the
whole model (evaluation forward; training forward + backward).

  python benchmarks/conv_kernels.py [--batch 128]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from nad_jax import models  # noqa: E402
from nad_jax import train as T  # noqa: E402
from nad_jax.kernels import onednn  # noqa: E402

CONVS = {'xla': lax.conv_general_dilated, 'onednn': onednn.conv_general_dilated}
# (height, in channels, out channels, stride) of WRN-16-1's 3x3 convolutions.
SHAPES = ((32, 3, 16, 1), (32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (8, 64, 64, 1))


def best_ms(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def single_conv(batch: int) -> None:
  rng = np.random.default_rng(0)
  print('one conv: height, in -> out, stride | forward xla / onednn | + gradients xla / onednn')
  for height, cin, cout, stride in SHAPES:
    x = jnp.asarray(rng.standard_normal((batch, height, height, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), jnp.float32)
    times = []
    for conv in CONVS.values():
      apply = lambda a, b, conv=conv: conv(a, b, (stride, stride), ((1, 1), (1, 1)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      times.append(best_ms(jax.jit(apply), x, w))
      grads = jax.grad(lambda a, b: jnp.sum(apply(a, b) ** 2), argnums=(0, 1))
      times.append(best_ms(jax.jit(grads), x, w))
    print(f'{height:>3} {cin:>3} -> {cout:<3} s{stride} | {times[0]:6.2f} / {times[2]:6.2f} '
          f'| {times[1]:6.2f} / {times[3]:6.2f}')


def whole_model(batch: int) -> None:
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32)
  print('WRN-16-1: conv | eval forward ms | training forward + backward ms')
  for name in CONVS:
    model = models.build_model('wrn16_1', 10, conv=name)
    variables = model.init(jax.random.key(0), x, train=False)
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False),
                      compiler_options=T.cpu_compiler_options(training=False))

    def loss(params, x, model=model):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'])
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    backward = jax.jit(jax.grad(loss), compiler_options=T.cpu_compiler_options(training=True))
    print(f'{name:>6} | {best_ms(forward, variables, x):6.1f} | '
          f'{best_ms(backward, variables["params"], x):6.1f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  args = parser.parse_args()
  onednn.load()
  single_conv(args.batch)
  whole_model(args.batch)


if __name__ == '__main__':
  main()
