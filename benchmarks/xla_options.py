"""Times a WRN-16-1 train / NAD / eval step under given XLA:CPU compile options.

The options replace nad-jax's own (`train.cpu_compiler_options`), so one command
compares a setting against the default; best and median of 12 epochs of 4 steps.

  python benchmarks/xla_options.py train                 # nad-jax's options
  python benchmarks/xla_options.py train '{"xla_cpu_experimental_ynn_fusion_type": ""}'
  python benchmarks/xla_options.py eval '{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}'
  python benchmarks/xla_options.py nad --defaults    # XLA's own defaults (no options)
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from nad_jax import attacks, data, defaults, models  # noqa: E402
from nad_jax import train as T  # noqa: E402


def main(part: str, options: str | None, batch: int = 128, steps: int = 4) -> None:
  if options is not None:
    chosen = {} if options == '--defaults' else json.loads(options)
    T.cpu_compiler_options = lambda training: chosen
  n = steps * batch
  mesh = T.make_mesh(1)
  model = models.build_model('wrn16_1', 10)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  ds = data.synthetic(0, n, 0)
  nad = part == 'nad'
  recipe = T.Recipe(batch, crop_flip=nad, cutout=3 if nad else 0,
                    betas=(500.0, 1000.0, 1000.0) if nad else (),
                    layers=tuple(model.distill_layers) if nad else ())
  tx = T.make_optimizer(defaults.sgd_stage(1, batch, 0.1), steps)
  state = T.replicate(T.state_from_variables(variables, tx), mesh)
  teacher = T.replicate(variables, mesh) if nad else {}
  on_device = T.replicate((ds.train_images, ds.train_labels, np.zeros(n, bool)), mesh)
  if part == 'eval':
    attack = attacks.build_attack(ml_collections.ConfigDict(dict(
        name='badnets', target_label=5, poison_rate=0.1, mode='all_to_one', pattern='grid',
        size=3, corner='bottom_right', seed=0)), 10, (32, 32, 3))
    test = T.make_test_set(ds.train_images, ds.train_labels, batch, mesh, attack)
    evaluate = T.make_evaluate(model, mesh, T.normalizer(None, None), attack, False)
    run = lambda: evaluate(state.variables, test, jax.random.key(0))
    n += int(np.sum(test.backdoor_valid))  # the clean pass and the triggered non-target pass
  else:
    epoch = T.TrainEpoch(model, tx, mesh, recipe, T.normalizer(None, None), None, False)

    def run():
      nonlocal state
      state, metrics = epoch(state, teacher, *on_device, jax.random.key(1))
      return metrics
  jax.block_until_ready(run())  # compile + warm-up
  seconds = []
  for _ in range(12):
    start = time.perf_counter()
    jax.block_until_ready(run())
    seconds.append(time.perf_counter() - start)
  seconds.sort()
  print(f'{part} batch {batch}: best {n / seconds[0]:.0f}, median {n / seconds[6]:.0f} '
        f'{"forwards" if part == "eval" else "img"}/s; options {options or "nad-jax"}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
