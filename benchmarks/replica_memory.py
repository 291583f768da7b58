"""Device memory of the NAD training step with K stacked replicas (config.seeds).

Compiles (does not run) the NAD stage's step, as bench.py's stage part builds it
(2,500 clean images at batch 64, crop+flip+Cutout, AT loss on three layers), for each
K, and prints XLA's memory analysis of the compiled step: its arguments (the replicas'
states, teachers and training sets), its temporaries and what it needs in all, which
is what nad-jax compares with a device's free memory before it trains K replicas.

  python benchmarks/replica_memory.py --model wrn16_1 --replicas 1,2,4,8
"""

import argparse
import os
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--model', default='wrn16_1')
  parser.add_argument('--batch', type=bench.positive_int, default=64)
  parser.add_argument('--images', type=bench.positive_int, default=2500,
                      help='the clean subset per replica')
  parser.add_argument('--replicas', type=bench.positive_ints, default='1,2,4,8')
  parser.add_argument('--conv', default='auto', choices=('auto', 'xla', 'onednn'))
  args = parser.parse_args(argv)
  if args.batch > args.images:
    parser.error(f'--batch {args.batch}: more than the {args.images} --images')

  import jax
  import jax.numpy as jnp
  import numpy as np
  from nad_jax import defaults, models
  from nad_jax import stages
  from nad_jax import train as train_lib

  if args.model not in models.MODELS:
    parser.error(f"--model {args.model!r}: one of {', '.join(models.MODELS)}")
  model = models.build_model(args.model, 10, 'float32', args.conv)
  mesh = train_lib.make_mesh()
  stage = defaults.sgd_stage(1, args.batch, 0.01)
  recipe = train_lib.Recipe(args.batch, crop_flip=True, cutout=3, betas=(500., 1000., 1000.),
                            layers=tuple(model.distill_layers))
  tx = train_lib.make_optimizer(stage, args.images // args.batch)
  training_set = (np.zeros((args.images, 32, 32, 3), np.uint8),
                  np.zeros(args.images, np.int32), np.zeros(args.images, bool))
  mib = lambda n: n / 2**20
  print(f'{args.model}, batch {args.batch}, {args.images} images per replica, '
        f'{jax.default_backend()}; MiB')
  print('| K | arguments | temporaries | needed | needed per replica |')
  print('|---|---|---|---|---|')
  for count in args.replicas:
    stacked = count > 1
    init = lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    start = lambda variables: train_lib.state_from_variables(variables, tx)
    if stacked:
      variables = jax.vmap(init)(jax.random.split(jax.random.key(0), count))
      state = jax.vmap(start)(variables)
      data = tuple(np.broadcast_to(x, (count, *x.shape)) for x in training_set)
    else:
      variables = init(jax.random.key(0))
      state, data = start(variables), training_set
    run = train_lib.TrainEpoch(model, tx, mesh, recipe, train_lib.normalizer(None, None), None,
                               scan=False, replicas=stacked)
    compiled = run.compile(train_lib.replicate(state, mesh), train_lib.replicate(variables, mesh),
                           *train_lib.replicate(data, mesh))
    analysis, needed = compiled.memory_analysis(), stages.memory_needed(compiled)
    print(f'| {count} | {mib(analysis.argument_size_in_bytes):.1f} | '
          f'{mib(analysis.temp_size_in_bytes):.1f} | {mib(needed):.1f} | '
          f'{mib(needed) / count:.1f} |', flush=True)


if __name__ == '__main__':
  main()
