"""Mode connectivity repair (MCR; Zhao et al., "Bridging Mode Connectivity in Loss
Landscapes and Adversarial Robustness", ICLR 2020, whose path connection is Garipov et
al.'s, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018).

A quadratic Bezier curve joins the backdoored model (t = 0) and the fine-tuned
one (t = 1):

  theta(t) = (1 - t)^2 theta_0 + 2 t (1 - t) theta_1 + t^2 theta_2,

over every parameter, BatchNorm scales and shifts included. Only the control
point theta_1 is trained (initialised at the midpoint of the end points): on
the clean subset, cross-entropy of the model at a t ~ U(0, 1) drawn per step,
BatchNorm in training mode. As in the authors' code (and Garipov et al.'s), the
BatchNorm statistics of a point are not on the curve: they are recomputed on the
clean subset for each t where the curve is evaluated (the mean over batches of
each batch's mean and variance; batches of `data.eval_batch_size`, where the
authors' code uses its training loader's 128). The defense is the model at
`mcr.t` (0.3 by default, where NAD's Table 1 reads MCR); the whole curve is
reported.

The curve's training recipe (`config.mcr`, nad_jax/defaults.py) is that of the
authors' code, IBM/model-sanitization, backdoor/backdoor-cifar (README.md "Training
the curves"; train.py; data.py `loaders_part_test`; curves.py; utils.py):
- 100 epochs (train.py --epochs default), batch 128 (--batch_size), a t ~ U(0, 1)
  per batch (curves.CurveNet.forward), ends fixed (--fix_start, --fix_end), the
  control point initialised on the segment (--init_linear, num_bends 3).
- SGD, momentum 0.9, not Nesterov; lr 0.01 (--lr default; the README's CIFAR-10
  examples use 0.015 for VGG16 and 0.03 for PreResNet-164 and WRN-28-10), held for
  the first half of the epochs, then linearly down to 1% of it at 90% of the
  epochs, then 1% (train.py `learning_rate_schedule`: `train.curve_lr_factor`).
- Weight decay 1e-4 (--wd) not as decay of the control point (the optimiser's is
  0 for curves) but as the loss term 0.5 * wd * ||theta(t)||^2 on the sampled
  point's weights, BatchNorm's scales and shifts included (curves.l2_regularizer).
- No augmentation: the clean images go through the test transform.
- An epoch is a fixed number of samples, not one pass over the clean images:
  `loaders_part_test` draws the bonafide images (1% of 5,000 test images there,
  `perc_training`; the paper varies their count) and repeats them to 10,000
  samples, so an epoch is 79 batches of 128 whatever the clean count: 7,900 steps
  in all (`mcr.samples_per_epoch` = 10,000; the clean subset repeated, whole
  copies first, then shuffled each epoch).
- The curve is evaluated at 11 equally spaced t (eval_curve.py --num_points),
  BatchNorm statistics updated on the training loader at each t (utils.update_bn).

Where nad-jax departs: the clean images are the defender's clean training subset
(`data.clean_fraction`, NAD's setting), not half of the test split, and the
metrics are on the whole test split; the curve's t = 1 end is the backdoored model
fine-tuned on that subset (the FT defense), as NAD's comparison uses MCR, where the
authors' code connects two models trained on the same poisoned data; the batches
drop their last partial batch (78 steps per 10,000-sample epoch, not 79), as every
stage of nad-jax does; the curve is evaluated during training every
`mcr.eval_every` epochs (the authors' is not, for networks with BatchNorm), which
is also where a killed run resumes.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nad_jax import stages
from nad_jax.defenses import finetune


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


def curve_point(ctx: stages.Context, t: float, start, middle_params, end, images):
  """The network at t: the curve's parameters with BatchNorm recomputed on `images`."""
  params = bezier(t, start['params'], middle_params, end['params'])
  stats = recompute_batch_stats(ctx.model, params, start['batch_stats'], images, ctx.normalize,
                                ctx.config.data.eval_batch_size)
  return {'params': params, 'batch_stats': stats}


def curve_loss(model, weight_decay: float):
  """The curve's training loss, in train.make_loss's signature: the control point
  `middle` is trained, the ends are frozen, and each step draws its own t ~ U(0, 1).

  Args:
    model: the Flax module.
    weight_decay: wd of the L2 term 0.5 * wd * ||theta(t)||^2 on the point's
      parameters (Garipov et al.'s curve regulariser).

  Returns:
    loss(middle, batch_stats, ends, x, y, key) -> (CE + L2, (batch_stats, CE, ())):
    ends = (start params, end params), x normalised float32 (N, H, W, C), y int32 (N,).
  """
  def loss(middle, batch_stats, ends, x, y, key):
    params = bezier(jax.random.uniform(key), ends[0], middle, ends[1])
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
    return ce + 0.5 * weight_decay * l2, (new['batch_stats'], ce, jnp.zeros(0, jnp.float32))
  return loss


def repeated(clean, samples: int):
  """The clean subset repeated to `samples` samples (whole copies, then the first
  images of one more), as the authors' `loaders_part_test` fills its 10,000.

  Args:
    clean: (images, labels, mask): (N, H, W, C), (N,), (N,), or stacked per seed
      ((K, N, ...); stages.clean_data).
    samples: the epoch's samples; at most N keeps the subset as it is.

  Returns:
    (images, labels, mask) with max(samples, N) samples each.
  """
  n = np.shape(clean[1])[-1]
  index = np.resize(np.arange(n), max(samples, n))
  images, labels, mask = (np.asarray(a) for a in clean)
  return (np.take(images, index, axis=images.ndim - 4), np.take(labels, index, axis=-1),
          np.take(mask, index, axis=-1))


def curve_ts(cfg) -> list[float]:
  """`cfg.points` equally spaced t in [0, 1], and `cfg.t` among them."""
  ts = [round(float(t), 4) for t in np.linspace(0.0, 1.0, cfg.points)]
  return ts if cfg.t in ts else sorted(ts + [cfg.t])


def repair(ctx: stages.Context, start, end, clean, name: str = 'mcr') -> stages.StageResult:
  """Trains (or resumes) the curve from `start` (backdoored) to `end` (fine-tuned) on
  `clean`, repeated to `mcr.samples_per_epoch` samples an epoch, with `config.mcr`
  (the module docstring gives the recipe), through the engine's TrainEpoch, and
  evaluates it at `mcr.points` values of t.

  Args:
    ctx: the stage Context.
    start, end: the end points' {'params', 'batch_stats'} (on the devices).
    clean: the clean subset (images, labels, mask), as `stages.clean_data` returns.
    name: the stage's name and folder.

  Returns:
    StageResult of the model at mcr.t (BatchNorm recomputed); its history has that
    model after every evaluated epoch, its info {'t', 'curve'}: the metrics along
    the whole curve.
  """
  cfg = ctx.config.mcr
  images = clean[0]
  ends = (start['params'], end['params'])
  middle = jax.tree.map(lambda a, b: (a + b) / 2, *ends)
  point = lambda t, variables: curve_point(ctx, t, start, variables['params'], end, images)
  optimizer = cfg.copy_and_resolve_references()
  optimizer.weight_decay = 0.0  # the L2 term is on the curve's point, in the loss
  trained = stages.train_stage(
      ctx, name, optimizer, stages.recipe_for(cfg),
      {'params': middle, 'batch_stats': start['batch_stats']},
      *repeated(clean, cfg.samples_per_epoch), None, frozen=ends,
      loss=curve_loss(ctx.model, cfg.weight_decay),
      readout=lambda variables: point(cfg.t, variables))

  # In the stage folder: deleting the folder to train the curve again deletes its evaluation.
  curve_file = ctx.workdir and os.path.join(ctx.workdir, name, 'curve.json')
  ts = curve_ts(cfg)
  curve = None
  if curve_file and os.path.exists(curve_file):
    with open(curve_file) as f:
      saved = json.load(f)
    if saved.get('epochs') == cfg.epochs and [c['t'] for c in saved['curve']] == ts:
      curve = saved['curve']
  if curve is None:
    curve = [{'t': t, **stages.evaluate(ctx, point(t, trained.variables))} for t in ts]
    if curve_file:
      stages.write_json(curve_file, {'epochs': cfg.epochs, 'curve': curve})
  stages.log(f'[{name}] curve: ' + '  '.join(
      f't={c["t"]:.2f} acc {c["acc"]:.1f} asr {c["asr"]:.1f}' for c in curve))
  return stages.StageResult(point(cfg.t, trained.variables), trained.history, trained.timing,
                            {'t': cfg.t, 'curve': curve})


def erase(ctx: stages.Context, student, clean, fine_tuned: stages.StageResult | None = None,
          student_metrics: dict | None = None) -> stages.StageResult:
  """MCR as one defense: the curve from `student` to its fine-tuned model.

  Args:
    ctx, student, clean: as for `repair`.
    fine_tuned: the FT defense's result, where it ran already; None: trained here.
    student_metrics: the backdoored model's METRICS where known, for the FT stage
      trained here (`finetune.finetune`).

  Returns:
    `repair`'s StageResult.
  """
  if fine_tuned is None:
    fine_tuned = finetune.finetune(ctx, student, clean, student_metrics=student_metrics)
  return repair(ctx, student, fine_tuned.variables, clean)
