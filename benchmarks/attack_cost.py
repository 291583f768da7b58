"""The cost of poisoning on the device: training img/s with and without each attack.

python benchmarks/attack_cost.py [--model=wrn16_1] [--steps=30] [--batch=64]

For each attack of configs/quickstart.py, one TrainEpoch step (the jitted step the
backdoored stage runs: gather, trigger the poisoned samples, augment, forward,
backward, update) is compiled for the quickstart data with that attack, or with no
attack, and timed over `steps` steps; every sample of the batch is marked poisoned
(the worst case: the trigger is computed for the whole batch anyway, and only
selected with jnp.where). Rounds are interleaved to even out load from other
processes; the median per configuration is reported. The trigger alone (jitted,
one batch) is timed too.
"""

import argparse
import os
import sys
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from configs import quickstart  # pylint: disable=g-import-not-at-top
from nad_jax import attacks as attacks_lib
from nad_jax import data as data_lib
from nad_jax import models
from nad_jax import train as train_lib

ATTACKS = ('badnets', 'trojan', 'blend', 'sig', 'cl', 'refool', 'wanet')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', default='wrn16_1')
  parser.add_argument('--steps', type=int, default=30)  # at most an epoch's
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()

  config = quickstart.get_config()
  ds = data_lib.load_dataset(config.data)
  shape = ds.train_images.shape[1:]
  model = models.build_model(args.model, ds.num_classes)
  mesh = train_lib.make_mesh()
  normalize = train_lib.normalizer(None, None)
  stage = config.backdoor_training
  steps_per_epoch = len(ds.train_images) // args.batch
  tx = train_lib.make_optimizer(stage, steps_per_epoch)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
  recipe = train_lib.Recipe(args.batch, stage.crop_flip, stage.cutout)
  on_device = train_lib.replicate((ds.train_images, ds.train_labels,
                                   np.ones(len(ds.train_images), bool)), mesh)

  runs, trigger_ms = {}, {}
  for name in ('none', *ATTACKS):
    attack = None
    if name != 'none':
      cfg = quickstart.get_config(name).attack
      attack = attacks_lib.build_attack(cfg, ds.num_classes, shape, ds)
      batch = jnp.asarray(ds.train_images[:args.batch], jnp.float32)
      fn = jax.jit(attack.trigger)
      fn(batch, jax.random.key(0)).block_until_ready()
      start = time.perf_counter()
      for i in range(20):
        fn(batch, jax.random.key(i)).block_until_ready()
      trigger_ms[name] = (time.perf_counter() - start) / 20 * 1e3
    epoch = train_lib.TrainEpoch(model, tx, mesh, recipe, normalize, attack, scan=False)
    state = train_lib.replicate(train_lib.state_from_variables(variables, tx), mesh)
    epoch.compile(state, {}, *on_device)
    runs[name] = (epoch, state)

  speeds = {name: [] for name in runs}
  order, keys = runs['none'][0]._schedule(jax.random.key(1), len(ds.train_images))
  for _ in range(args.rounds):
    for name, (epoch, state) in runs.items():
      state, _ = epoch._update(state, {}, *on_device, order, keys, 0)  # warm
      jax.block_until_ready(state)
      start = time.perf_counter()
      for i in range(args.steps):
        state, _ = epoch._update(state, {}, *on_device, order, keys, i)
      jax.block_until_ready(state)
      speeds[name].append(args.steps * args.batch / (time.perf_counter() - start))
      runs[name] = (epoch, state)

  base = statistics.median(speeds['none'])
  print(f'{jax.device_count()} {jax.default_backend()} device(s), model {args.model}, '
        f'batch {args.batch}, {args.steps} steps x {args.rounds} rounds')
  print(f'{"attack":<10}{"img/s":>10}{"vs none":>10}{"trigger ms/batch":>18}')
  for name, values in speeds.items():
    median = statistics.median(values)
    print(f'{name:<10}{median:>10.0f}{100 * (median / base - 1):>+9.1f}%'
          f'{trigger_ms.get(name, float("nan")):>18.2f}')


if __name__ == '__main__':
  main()
