"""How fast could the NAD stage (d) be on this machine? A compute bound from XLA's FLOP count.

Counts the floating-point operations of a WRN-16-1 forward and of a NAD step with
XLA's own cost analysis (the compiled functions nad-jax runs), measures what this
machine's float32 matrix multiply sustains (the best case for any convolution
code: jnp.dot and, when installed, torch.mm), and prints the shortest time the
stage's arithmetic can take at that rate next to the stage times in a bench.py
result file.

  python benchmarks/roofline.py [--stage-json benchmarks/results/stage_wrn16_1.json]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from nad_jax import models  # noqa: E402
from nad_jax import train as T  # noqa: E402

# Stage (d) as the official code runs it (benchmarks/README.md).
EPOCHS, CLEAN_IMAGES, BATCH = 20, 2500, 64
EVAL_FORWARDS = 10_000 + 9_000  # clean test set + triggered non-target images


def flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis['flops'])


def forward_flops(model, variables, batch: int) -> float:
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  return flops(apply.lower(variables, x).compile()) / batch


def nad_step_flops(model, variables, batch: int) -> float:
  tx = T.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=0.1, lr_boundaries=(), lr_decay=0.1, momentum=0.9, nesterov=True,
      weight_decay=1e-4)), 1)
  mesh = T.make_mesh(1)
  recipe = T.Recipe(batch, crop_flip=True, cutout=3, betas=(500.0, 1000.0, 1000.0),
                    layers=tuple(model.distill_layers))
  epoch = T.TrainEpoch(model, tx, mesh, recipe, T.normalizer(None, None), None, scan=False)
  state = T.replicate(T.state_from_variables(variables, tx), mesh)
  data = T.replicate((np.zeros((batch, 32, 32, 3), np.uint8), np.zeros(batch, np.int32),
                      np.zeros(batch, bool)), mesh)
  epoch.compile(state, variables, *data)
  return flops(epoch._update) / batch  # pylint: disable=protected-access


def best_rate(matmul, a, b, repeats: int = 10) -> float:
  """GFLOP/s of the fastest of `repeats` n x n x n products."""
  n = a.shape[0]
  matmul(a, b)
  best = min(timed(matmul, a, b) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def timed(fn, *args) -> float:
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def gemm_rates(n: int = 2048) -> dict:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  dot = jax.jit(jnp.dot)
  rates = {'jax': best_rate(lambda x, y: dot(x, y).block_until_ready(), a, a)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return rates
  t = torch.from_numpy(np.array(a))
  with torch.no_grad():
    rates['torch'] = best_rate(torch.mm, t, t)
  return rates


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stage-json', default='benchmarks/results/stage_wrn16_1.json')
  args = parser.parse_args(argv)
  model = models.build_model('wrn16_1', 10)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  forward = forward_flops(model, variables, 1000)
  nad = nad_step_flops(model, variables, BATCH)
  steps = CLEAN_IMAGES // BATCH
  train_total = EPOCHS * steps * BATCH * nad
  eval_total = (EPOCHS + 1) * EVAL_FORWARDS * forward
  total = train_total + eval_total
  rates = gemm_rates()
  peak = max(rates.values())
  print(f'XLA FLOPs per image: forward {forward / 1e6:.1f} M, NAD step {nad / 1e6:.1f} M '
        f'(student forward + backward + teacher forward)')
  print(f'stage (d): train {train_total / 1e12:.2f} T + eval {eval_total / 1e12:.2f} T '
        f'= {total / 1e12:.2f} TFLOP')
  print('float32 GEMM 2048^3 on this machine: '
        + ', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in rates.items()))
  print(f'stage (d) at the GEMM rate ({peak:.0f} GFLOP/s): at least {total / peak / 1e9:.1f} s')
  if os.path.exists(args.stage_json):
    with open(args.stage_json) as f:
      rows = json.load(f)['rows']
    for row in rows:
      if row.get('part') == 'stage':
        rate = total / row['wall_s'] / 1e9
        print(f'{row["framework"]:>8}: {row["wall_s"]:.1f} s measured = {rate:.0f} GFLOP/s '
              f'({100 * rate / peak:.0f}% of the GEMM rate)')
    torch_rows = [r for r in rows if r.get('part') == 'stage' and r['framework'] == 'pytorch']
    if torch_rows:
      target = torch_rows[0]['wall_s'] / 2
      print(f'target (half of PyTorch): {target:.1f} s = {total / target / 1e9:.0f} GFLOP/s '
            f'({100 * total / target / 1e9 / peak:.0f}% of the GEMM rate)')


if __name__ == '__main__':
  main()
