"""Mode connectivity repair (MCR; Zhao et al., "Bridging Mode Connectivity in Loss
Landscapes and Adversarial Robustness", ICLR 2020).

A quadratic Bezier curve joins the backdoored model (t = 0) and the fine-tuned
one (t = 1):

  theta(t) = (1 - t)^2 theta_0 + 2 t (1 - t) theta_1 + t^2 theta_2,

over every parameter, BatchNorm scales and shifts included. Only the control
point theta_1 is trained (initialised at the midpoint of the end points): on
the clean subset, cross-entropy of the model at a t ~ U(0, 1) drawn per step,
BatchNorm in training mode. As in the authors' code (and Garipov et al.'s), the
BatchNorm statistics of a point are not on the curve: they are recomputed on the
clean subset for each t where the curve is evaluated (the mean over batches of
each batch's mean and variance). The defense is the model at `mcr.t` (0.3 by
default, the paper's choice for 5% clean data); the whole curve is reported.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nad_jax import data as data_lib
from nad_jax import pipeline
from nad_jax import train as train_lib


def bezier(t, start, middle, end):
  """The curve's parameters at t: a pytree like `start`."""
  return jax.tree.map(lambda a, b, c: (1 - t) ** 2 * a + 2 * t * (1 - t) * b + t ** 2 * c,
                      start, middle, end)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_statistics(model, normalize, params, batch_stats, images):
  """Each BatchNorm's batch mean and variance on `images` (train mode)."""
  x = normalize(images.astype(jnp.float32))
  run = lambda stats: model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                  mutable=['batch_stats'])[1]['batch_stats']
  from_zero = run(jax.tree.map(jnp.zeros_like, batch_stats))
  from_one = run(jax.tree.map(jnp.ones_like, batch_stats))
  return jax.tree.map(lambda a, b: a / (1 - (b - a)), from_zero, from_one)


def recompute_batch_stats(model, params, batch_stats, images, normalize, batch_size: int):
  """BatchNorm statistics of the network `params` on uint8 `images`.

  Each layer's running mean and variance become the size-weighted mean over
  batches of that batch's statistics (train-mode forward, no augmentation), as
  torch's `update_bn`. Flax updates a statistic as m * old + (1 - m) * batch:
  running it from 0 and from 1 gives both (1 - m) * batch and m, whatever the
  layers' momentum m.
  """
  images = np.asarray(images)
  chunks = np.array_split(np.arange(len(images)), max(1, -(-len(images) // batch_size)))
  total = None
  for chunk in chunks:
    stats = _batch_statistics(model, normalize, params, batch_stats, images[chunk])
    stats = jax.tree.map(lambda s: s * len(chunk), stats)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return jax.tree.map(lambda s: s / len(images), total)


def curve_point(ctx: pipeline.Context, t: float, start, middle_params, end, images):
  """The network at t: the curve's parameters with BatchNorm recomputed on `images`."""
  params = bezier(t, start['params'], middle_params, end['params'])
  stats = recompute_batch_stats(ctx.model, params, start['batch_stats'], images, ctx.normalize,
                                ctx.config.data.eval_batch_size)
  return {'params': params, 'batch_stats': stats}


def make_step(ctx: pipeline.Context, tx, recipe: train_lib.Recipe):
  """One jitted curve-training step (per-step dispatch, like TrainEpoch on CPU)."""
  batch_sharding = NamedSharding(ctx.mesh, P('data'))
  model, normalize = ctx.model, ctx.normalize

  def loss_fn(middle, batch_stats, ends, t, x, y):
    params = bezier(t, ends[0], middle, ends[1])
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, new['batch_stats']

  def step(state, ends, images, labels, indices, key):
    k_t, k_augment = jax.random.split(key)
    t = jax.random.uniform(k_t)
    x = jax.lax.with_sharding_constraint(images[indices].astype(jnp.float32), batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[indices], batch_sharding)
    x = normalize(data_lib.augment(x, k_augment, recipe.crop_flip, recipe.cutout))
    (ce, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, ends, t, x, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return train_lib.TrainState(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                batch_stats=batch_stats, opt_state=opt_state), ce

  return jax.jit(step, donate_argnums=0)


def repair(ctx: pipeline.Context, start, end, clean, name: str = 'mcr'):
  """Trains (or resumes) the curve from `start` (backdoored) to `end` (fine-tuned) on
  `clean` with `config.mcr`, evaluates it at `mcr.points` values of t.

  Returns (variables at mcr.t, history, timing, info); history has the model at
  mcr.t after every epoch, info['curve'] the metrics along the whole curve.
  """
  config = ctx.config
  cfg = config.mcr
  images, labels, _ = clean
  steps_per_epoch = len(images) // cfg.batch_size
  tx = train_lib.make_optimizer(cfg, steps_per_epoch)
  middle = jax.tree.map(lambda a, b: (a + b) / 2, start['params'], end['params'])
  state = train_lib.replicate(jax.device_get(train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=middle, batch_stats=start['batch_stats'],
      opt_state=tx.init(middle))), ctx.mesh)
  ends = (start['params'], end['params'])
  point = lambda state: curve_point(ctx, cfg.t, start, state.params, end, images)

  checkpoints = pipeline.open_stage(ctx, name) if ctx.workdir is not None else None
  done = checkpoints.latest_epoch() if checkpoints else None
  if done is not None:
    state, history = pipeline.restore_stage(checkpoints, name, done, state)
  else:
    done, history = 0, [{'epoch': 0, 't': cfg.t, **pipeline.evaluate(ctx, point(state))}]
  timing = {'compile_s': 0.0, 'img_per_s': []}
  if done < cfg.epochs:
    step = make_step(ctx, tx, pipeline.recipe_for(cfg))
    on_device = train_lib.replicate((images, labels), ctx.mesh)
    stage_key = jax.random.fold_in(jax.random.key(config.seed), 100)
    for epoch in range(done, cfg.epochs):
      start_time = time.perf_counter()
      key = jax.random.fold_in(stage_key, epoch)
      k_perm, k_steps = jax.random.split(key)
      order = jax.random.permutation(k_perm, len(images))[:steps_per_epoch * cfg.batch_size]
      order = order.reshape(steps_per_epoch, cfg.batch_size)
      keys = jax.random.split(k_steps, steps_per_epoch)
      losses = []
      for i in range(steps_per_epoch):
        state, ce = step(state, ends, *on_device, order[i], keys[i])
        losses.append(ce)
      ce = float(np.mean(jax.device_get(losses)))
      seconds = time.perf_counter() - start_time
      if not np.isfinite(ce):
        raise FloatingPointError(f'{name}: the loss became non-finite in epoch {epoch + 1}; '
                                 'lower mcr.learning_rate')
      speed = steps_per_epoch * cfg.batch_size / seconds
      timing['img_per_s'].append(round(speed, 1))
      message = f'[{name}] epoch {epoch + 1}/{cfg.epochs}  ce {ce:.4f}'
      entry = {'epoch': epoch + 1, 't': cfg.t, 'ce': round(ce, 5)}
      evaluated = pipeline.evaluated_epoch(epoch + 1, cfg)
      if evaluated:
        entry.update(pipeline.evaluate(ctx, point(state)))
        message += (f'  at t={cfg.t}: acc {entry["acc"]:.2f}  '
                    f'acc_nontarget {entry["acc_nontarget"]:.2f}  asr {entry["asr"]:.2f}')
      history.append(entry)
      pipeline.log(f'{message}  ({speed:.0f} img/s)')
      if evaluated and checkpoints:
        checkpoints.save(epoch + 1, state, history)
  if checkpoints:
    checkpoints.close()

  curve_file = ctx.workdir and os.path.join(ctx.workdir, f'{name}_curve.json')
  ts = [round(float(t), 4) for t in np.linspace(0.0, 1.0, cfg.points)]
  if cfg.t not in ts:
    ts = sorted(ts + [cfg.t])
  curve = None
  if curve_file and os.path.exists(curve_file):
    with open(curve_file) as f:
      saved = json.load(f)
    if saved.get('epochs') == cfg.epochs and [c['t'] for c in saved['curve']] == ts:
      curve = saved['curve']
  if curve is None:
    curve = [{'t': t, **pipeline.evaluate(ctx, curve_point(ctx, t, start, state.params, end,
                                                           images))} for t in ts]
    if curve_file:
      pipeline.write_json(curve_file, {'epochs': cfg.epochs, 'curve': curve})
  pipeline.log(f'[{name}] curve: ' + '  '.join(
      f't={c["t"]:.2f} acc {c["acc"]:.1f} asr {c["asr"]:.1f}' for c in curve))
  return point(state), history, timing, {'t': cfg.t, 'curve': curve}
