"""How fast could the NAD stage (d) be on this machine? A compute bound from XLA's FLOP count.

Counts the floating-point operations of a WRN-16-1 forward and of a NAD step with
XLA's own cost analysis (the compiled functions nad-jax runs), measures what this
machine's float32 matrix multiply sustains (the best case for any convolution
code: jnp.dot and, when installed, torch.mm), and prints the shortest time the
stage's arithmetic can take at that rate next to the stage times in a bench.py
result file. That file must come from this machine (the same CPU model, core count,
backend and accelerator, as bench.py records them): a GEMM rate measured here and a
stage time measured elsewhere make no ratio, so another machine's file is refused.
Measure the stage here first, or pass --stage-json '' for the bound alone.

  python benchmarks/bench.py --models wrn16_1 --parts stage --batches 64 --torch on \
      --out benchmarks/results/stage_here
  python benchmarks/roofline.py --stage-json benchmarks/results/stage_here.json
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench  # noqa: E402

from nad_jax import defaults, models, stages  # noqa: E402
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
  tx = T.make_optimizer(defaults.sgd_stage(1, batch, 0.1), 1)
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


def this_machine() -> dict:
  """What a stage time depends on, as bench.py records it: CPU model and features, cores,
  backend and accelerator (the host name is left out: rented machines share theirs)."""
  here = stages.machine()
  return {key: here[key] for key in ('cpu', 'cpu_features', 'cores', 'backend', 'accelerator')}


def stage_rows(path: str) -> tuple[list, dict]:
  """The rows of a bench.py result file measured on this machine that time the stage whose
  FLOPs this script counts (`is_stage`), and the file's `meta`.

  A file older than bench.py's record of CPU features is taken on its CPU model, cores,
  backend and accelerator alone (the printout says so).

  Raises:
    SystemExit: one line naming the file, where it is missing, unreadable, from another
      machine or without such a row.
  """
  try:
    with open(path) as f:
      result = json.load(f)
    meta = result['meta']
    recorded = {'cpu': meta['machine']['cpu'], 'cores': meta['machine']['cores'],
                'backend': meta['backend'], 'accelerator': meta.get('accelerator', '')}
    if 'cpu_features' in meta['machine']:
      recorded['cpu_features'] = meta['machine']['cpu_features']
    rows = [row for row in result['rows'] if isinstance(row, dict) and is_stage(row)]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    sys.exit(f'error: --stage-json {path}: not a readable bench.py result ({e!r})')
  here = {key: value for key, value in this_machine().items() if key in recorded}
  if recorded != here:
    features = lambda m: ', '.join(m.get('cpu_features', ['features not recorded']))
    describe = lambda m: (f"{m['cpu']} ({features(m)}), {m['cores']} cores, {m['backend']}"
                          + (f" ({m['accelerator']})" if m['accelerator'] else ''))
    sys.exit(f'error: --stage-json {path} was measured on {describe(recorded)}, not on this '
             f'machine ({describe(here)}); measure the stage here with benchmarks/bench.py '
             "(see this file's docstring) or pass --stage-json ''")
  if not rows:
    sys.exit(f'error: --stage-json {path}: no stage row of WRN-16-1 at batch {BATCH}, '
             f'{EPOCHS} epochs and one replica with its wall time (bench.py --parts stage); '
             "pass --stage-json '' for the bound alone")
  return rows, meta


def is_stage(row: dict) -> bool:
  """Whether a bench.py row times the stage whose FLOPs this script counts."""
  return (row.get('part') == 'stage' and row.get('model', 'wrn16_1') == 'wrn16_1'
          and row.get('batch', BATCH) == BATCH and row.get('epochs', EPOCHS) == EPOCHS
          and row.get('replicas', 1) == 1 and isinstance(row.get('wall_s'), (int, float))
          and row['wall_s'] > 0)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stage-json', default='benchmarks/results/stage_wrn16_1.json',
                      help="a bench.py result from this machine; '' for the bound alone")
  args = parser.parse_args(argv)
  rows, meta = stage_rows(args.stage_json) if args.stage_json else ([], {})  # before the long part
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
  if rows:  # stored stage times next to a rate measured now: say where each comes from
    load = meta.get('load_before', ['?'])[0]
    print(f'stage (d) times stored in {args.stage_json} (measured {meta.get("date", "?")}, '
          f'load average {load if isinstance(load, str) else f"{load:.2f}"} before; '
          + ('same CPU model, features, cores and backend'
             if 'cpu_features' in meta['machine'] else
             'same CPU model, cores and backend; CPU features not recorded')
          + '), against the GEMM rate measured now:')
  for row in rows:
    rate = total / row['wall_s'] / 1e9
    print(f'{row["framework"]:>8}: {row["wall_s"]:.1f} s stored = {rate:.0f} GFLOP/s '
          f'({100 * rate / peak:.0f}% of the GEMM rate now)')
  torch_rows = [r for r in rows if r['framework'] == 'pytorch']
  if torch_rows:
    target = torch_rows[0]['wall_s'] / 2
    print(f'target (half of PyTorch): {target:.1f} s = {total / target / 1e9:.0f} GFLOP/s '
          f'({100 * total / target / 1e9 / peak:.0f}% of the GEMM rate now)')


if __name__ == '__main__':
  main()
