"""Jitted training epochs and evaluation, data-parallel over a device mesh.

The training set lives on the devices for the whole stage. One call of the
compiled epoch shuffles it, and a lax.scan over its steps gathers each batch,
poisons, augments, runs the student (and the frozen teacher) and updates: one
dispatch per epoch. Batches are sharded over the mesh's 'data' axis; the state
is replicated, so XLA inserts the gradient all-reduce and BatchNorm sees the
global batch, exactly as on one device.
"""

from collections.abc import Callable, Sequence
import time
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nad_jax import data as data_lib
from nad_jax import models
from nad_jax.attacks import Attack
from nad_jax.attention import distillation_losses


@flax.struct.dataclass
class TrainState:
  """A model's training state; a pytree (flax.struct), saved whole by `checkpoint`.

  Attributes:
    step: int32 scalar, optimiser steps taken.
    params: the model's 'params' collection (float32).
    batch_stats: its 'batch_stats' collection (BatchNorm running mean/var); {} if none.
    opt_state: the optax state of `params`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    """{'params', 'batch_stats'}: what `model.apply` takes."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


class Recipe(NamedTuple):
  """The static settings of one training stage (they shape the compiled program)."""
  batch_size: int
  crop_flip: bool = False
  cutout: int = 0
  betas: tuple[float, ...] = ()  # one weight per distilled layer; empty: CE only
  layers: tuple[str, ...] = ()
  p: float = 2.0


# -------------------------------------------------------------------------- mesh & data

def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with the axis 'data' over which batches are sharded.

  Args:
    num_devices: use the first this many of `jax.devices()`; None or 0: all.

  Returns:
    The Mesh (Auto axis type).
  """
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places host arrays on every device of the mesh (works across hosts too).

  Args:
    tree: a pytree of host arrays (anything np.asarray takes), equal on every host.
    mesh: the device mesh.

  Returns:
    The same pytree of fully replicated jax.Arrays, dtypes kept.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def normalizer(mean: Sequence[float] | None, std: Sequence[float] | None
               ) -> Callable[[jax.Array], jax.Array]:
  """Maps float pixels in [0, 255] to the model's input scale: [0, 1], then (x-mean)/std.

  Args:
    mean: per-channel means on the [0, 1] scale (`config.model.mean`), or None
      for no standardisation (then `std` is ignored).
    std: per-channel standard deviations on the [0, 1] scale; set with `mean`.

  Returns:
    normalize(images): (N, H, W, C) float32 pixels in [0, 255] -> float32 of the
    same shape, in [0, 1] without mean, standardised with it. Jittable.
  """
  def normalize(images):
    images = images / 255.0
    if mean is not None:
      images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return images
  return normalize


# ------------------------------------------------------------------------------ training

# A stage's `lr_schedule` (every stage but MCR has 'step' where it sets none).
LR_SCHEDULES = ('step', 'cosine', 'curve')


def cosine_lr_factor(epoch, epochs: int):
  """The learning-rate factor of cosine annealing in epoch `epoch` (0-based): (1 + cos(pi *
  epoch / epochs)) / 2, from 1 in the first epoch towards 0 (PyTorch's CosineAnnealingLR with
  T_max = epochs, stepped once an epoch, as BackdoorBench's
  utils/aggregate_block/train_settings_generate.py uses it). `epoch` may be a traced integer;
  returns float32.
  """
  return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(epoch, jnp.float32) / epochs))


def curve_lr_factor(epoch, epochs: int):
  """The learning-rate factor of Garipov et al.'s curve schedule in epoch `epoch` (1-based).

  Constant 1 while epoch / epochs <= 0.5, then linear down to 0.01 at 0.9, then 0.01
  (timgaripov/dnn-mode-connectivity train.py, `learning_rate_schedule`; Zhao et al.
  train their curves with it). `epoch` may be a traced integer; returns float32.
  """
  progress = jnp.asarray(epoch, jnp.float32) / epochs
  return jnp.clip(1.0 - 0.99 * (progress - 0.5) / 0.4, 0.01, 1.0)


def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay and a per-epoch learning-rate schedule.

  Weight decay is added to the gradient before momentum (torch.optim.SGD's
  weight_decay). `cfg.lr_schedule` (LR_SCHEDULES) 'step' (also where the section has no
  such field) multiplies the learning rate by `lr_decay` at each of `lr_boundaries`;
  'cosine' and 'curve' set it per epoch by `cosine_lr_factor` and `curve_lr_factor`.

  Args:
    cfg: a stage's optimiser config with epochs, learning_rate, lr_boundaries (epochs),
      lr_decay, weight_decay, momentum (0 or None: plain SGD), nesterov and optionally
      lr_schedule.
    steps_per_epoch: optimiser steps per epoch, to turn epochs into steps.

  Returns:
    The optax transformation.
  """
  kind = getattr(cfg, 'lr_schedule', 'step')  # a surrogate's namespace has none
  lr, epochs = float(cfg.learning_rate), max(int(cfg.epochs), 1)
  if kind == 'curve':
    schedule = lambda step: lr * curve_lr_factor(step // steps_per_epoch + 1, epochs)
  elif kind == 'cosine':
    schedule = lambda step: lr * cosine_lr_factor(step // steps_per_epoch, epochs)
  else:
    schedule = optax.piecewise_constant_schedule(
        cfg.learning_rate,
        {int(epoch) * steps_per_epoch: cfg.lr_decay for epoch in cfg.lr_boundaries})
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


def init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
               image_shape: Sequence[int]) -> TrainState:
  """A freshly initialised TrainState.

  Args:
    model: the Flax module.
    tx: the optimiser.
    key: PRNG key for `model.init`.
    image_shape: (H, W, C) of one input image.

  Returns:
    The state at step 0.
  """
  return state_from_variables(models.initialize(model, key, tuple(image_shape)), tx)


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """A TrainState at step 0 around given variables, with a fresh optimiser state.

  Args:
    variables: {'params', optionally 'batch_stats'}; other collections are dropped.
    tx: the optimiser.

  Returns:
    The state; batch_stats is {} where `variables` has none.
  """
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def scan_by_default() -> bool:
  """Whether one dispatch per epoch (lax.scan over steps) pays on this backend.

  On accelerators it removes per-step dispatch. XLA:CPU runs convolutions
  inside a while loop about 20x slower than at the top level (15 vs 320 img/s
  for WRN-16-1), so on CPU each step is its own dispatch.

  Returns:
    True unless the default backend is CPU.
  """
  return jax.default_backend() != 'cpu'


def cpu_compiler_options(training: bool) -> dict[str, str]:
  """XLA:CPU options that the benchmarks measured fastest (benchmarks/README.md).

  In training, YNNPACK runs the large reductions (BatchNorm statistics and their
  gradients) about 8x faster than XLA's own loops: +25% img/s for WRN-16-1 on 2
  cores. Its other fusions (convolutions, element-wise) are slower than XLA's,
  and in evaluation, which has no large reductions, every YNNPACK fusion costs
  time. Other backends get no options.

  Args:
    training: options for the training step (True) or evaluation (False).

  Returns:
    XLA compiler options for `jax.jit(..., compiler_options=...)`; {} off CPU.
  """
  if jax.default_backend() != 'cpu':
    return {}
  return {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE' if training else ''}


def make_loss(model: nn.Module, recipe: Recipe) -> Callable[..., tuple[jax.Array, tuple]]:
  """loss(params, batch_stats, teacher, x, y, key) -> (total, (batch_stats, ce, at per layer)).

  Cross-entropy, plus sum(betas * AT) against the frozen teacher when a beta is non-zero.
  This is NAD's objective (Li et al., ICLR 2021), with the AT loss of `attention.at_loss`.

  Args:
    model: the student's Flax module (the teacher shares it).
    recipe: supplies betas, layers (sown names) and p.

  Returns:
    loss(params, batch_stats, teacher, x, y, key): teacher is the teacher's variables
    (unused without distillation), x (N, H, W, C) normalised float32 inputs, y (N,)
    int32 labels, key the step's PRNG key (unused here); it returns (total float32
    scalar, (new batch_stats, mean CE
    float32 scalar, (len(betas),) float32 AT losses, zeros without distillation)).
  """
  distill = any(recipe.betas)
  betas = jnp.asarray(recipe.betas, jnp.float32)

  def loss(params, batch_stats, teacher, x, y, key):
    del key  # deterministic given the batch
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats', 'intermediates'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if not distill:
      return ce, (new['batch_stats'], ce, jnp.zeros(len(recipe.betas), jnp.float32))
    _, sown = model.apply(teacher, x, train=False, mutable=['intermediates'])
    first = lambda tree: {k: v[0] for k, v in tree['intermediates'].items()}
    at = distillation_losses(first(new), first(sown), recipe.layers, recipe.p)
    return ce + jnp.sum(betas * at), (new['batch_stats'], ce, at)
  return loss


class TrainEpoch:
  """One epoch of training: epoch(state, teacher, images, labels, poisoned, key) -> (state, metrics).

  `poisoned` marks the samples that get the attack's trigger and label; the
  teacher is used only when `recipe.betas` has a non-zero weight, and gets no
  gradient. Every stage trains through this class, the baseline defenses too: a
  defense whose objective is not NAD's hands in its own `loss` (MCR's curve), and
  the `teacher` argument carries whatever frozen variables that loss reads.
  `compile(...)` compiles ahead of time so that its cost is known.

  With `replicas`, K independent models train side by side in one program (jax.vmap;
  `config.seeds`): the state, teacher and key carry a leading replica axis of size
  K, and so do the images, labels and poisoned mask where they differ between
  replicas ((K, N, H, W, C), (K, N), (K, N)); unstacked ones are shared by all.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, recipe: Recipe,
               normalize: Callable[[jax.Array], jax.Array],
               attack: Attack | None, scan: bool | None = None,
               loss: Callable[..., tuple[jax.Array, tuple]] | None = None,
               replicas: bool = False):
    """Builds the jitted step (or scanned epoch); nothing is compiled yet.

    Args:
      model: the student's Flax module.
      tx: the optimiser.
      mesh: the mesh whose 'data' axis shards the batches.
      recipe: batch size, augmentation and distillation settings.
      normalize: `normalizer`'s function, applied after augmentation and trigger.
      attack: poisons the samples marked `poisoned`; None: no poisoning.
      scan: one dispatch per epoch (lax.scan) if True, one per step if False;
        None: `scan_by_default()`.
      loss: a function with `make_loss`'s signature and returns, differentiated
        with respect to its first argument; None: `make_loss(model, recipe)`.
      replicas: train a stack of replicas (see the class docstring).
    """
    self.recipe = recipe
    self.scan = scan_by_default() if scan is None else scan
    batch_sharding = NamedSharding(mesh, P('data'))
    loss_fn = loss or make_loss(model, recipe)

    def step(state, teacher, images, labels, poisoned, order, keys, i):
      indices, key = order[i], keys[i]
      k_trigger, k_augment, k_loss = jax.random.split(key, 3)
      x = jax.lax.with_sharding_constraint(images[indices].astype(jnp.float32), batch_sharding)
      y = jax.lax.with_sharding_constraint(labels[indices], batch_sharding)
      x = data_lib.augment(x, k_augment, recipe.crop_flip, recipe.cutout)
      if attack is not None:
        # After augmentation, so the trigger sits where it will at test time.
        mask = poisoned[indices]
        x = jnp.where(mask[:, None, None, None], attack.trigger(x, k_trigger), x)
        y = jnp.where(mask, attack.relabel(y), y)
      x = normalize(x)
      grads, (batch_stats, ce, at) = jax.grad(loss_fn, has_aux=True)(
          state.params, state.batch_stats, teacher, x, y, k_loss)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)
      return state, {'ce': ce, 'at': at}

    def scan_steps(state, teacher, images, labels, poisoned, order, keys):
      body = lambda s, i: step(s, teacher, images, labels, poisoned, order, keys, i)
      state, metrics = jax.lax.scan(body, state, jnp.arange(order.shape[0]))
      return state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

    def schedule(key, num_images):
      """Each epoch's shuffled batches (the last partial batch is dropped) and step keys."""
      steps = num_images // recipe.batch_size
      k_perm, k_steps = jax.random.split(key)
      order = jax.random.permutation(k_perm, num_images)[:steps * recipe.batch_size]
      return order.reshape(steps, recipe.batch_size), jax.random.split(k_steps, steps)

    update = scan_steps if self.scan else step
    if replicas:
      update = over_replicas(update)
      schedule = jax.vmap(schedule, in_axes=(0, None))
    self._schedule = jax.jit(schedule, static_argnums=1)
    self._update = jax.jit(update, donate_argnums=0,
                           compiler_options=cpu_compiler_options(training=True))

  def compile(self, state: TrainState, teacher: Any, images: jax.Array, labels: jax.Array,
              poisoned: jax.Array) -> jax.stages.Compiled:
    """Compiles ahead of time for these shapes; later calls reuse the executables.

    Args:
      state, teacher, images, labels, poisoned: as for `__call__` (the key is not
        needed); only their shapes, dtypes and shardings matter.

    Returns:
      The compiled executable of one call (an epoch, or a step on CPU), whose
      `memory_analysis()` tells what it needs.
    """
    # Calling the schedule once compiles it, so that the first epoch compiles nothing.
    order, keys = self._schedule(self._key_like(state), poisoned.shape[-1])
    extra = () if self.scan else (0,)
    self._update = self._update.lower(state, teacher, images, labels, poisoned, order, keys,
                                      *extra).compile()
    return self._update

  @staticmethod
  def _key_like(state: TrainState) -> jax.Array:
    """A placeholder key shaped like the epoch's: (K,) keys for K replicas."""
    key = jax.random.key(0)
    return key if state.step.ndim == 0 else jax.random.split(key, state.step.shape[0])

  def __call__(self, state: TrainState, teacher: Any, images: jax.Array, labels: jax.Array,
               poisoned: jax.Array, key: jax.Array) -> tuple[TrainState, dict]:
    """Runs one epoch over a fresh shuffle; the last partial batch is dropped.

    Args:
      state: the replicated TrainState; donated (do not reuse it after the call).
      teacher: the teacher's {'params', 'batch_stats'}, or {} without distillation.
      images: (N, H, W, C) uint8 training images in [0, 255], on the devices.
      labels: (N,) int32 labels.
      poisoned: (N,) bool, True where the attack triggers and relabels.
      key: PRNG key of the epoch's shuffle, augmentation and triggers; (K,) keys
        for K replicas, which also stack the state and the returned metrics.

    Returns:
      (new state, {'ce': float32 scalar, 'at': (len(betas),) float32}), the
      metrics averaged over the epoch's steps.
    """
    order, keys = self._schedule(key, poisoned.shape[-1])
    if self.scan:  # one dispatch, which also averages the steps' metrics
      return self._update(state, teacher, images, labels, poisoned, order, keys)
    per_step = []
    for i in range(order.shape[-2]):
      state, m = self._update(state, teacher, images, labels, poisoned, order, keys, i)
      per_step.append(m)
    return state, jax.tree.map(lambda *m: jnp.mean(jnp.stack(m), axis=0), *per_step)


def over_replicas(update: Callable) -> Callable:
  """`update(state, teacher, images, labels, poisoned, order, keys, *step)` vmapped over
  a leading replica axis of the state, teacher, order and keys, and of the images
  (rank 5), labels and poisoned mask (rank 2) where they have one; `step` is shared."""
  def stacked(state, teacher, images, labels, poisoned, order, keys, *step):
    data_axes = tuple(0 if x.ndim > rank else None
                      for x, rank in ((images, 4), (labels, 1), (poisoned, 1)))
    in_axes = (0, 0, *data_axes, 0, 0, *[None] * len(step))
    return jax.vmap(update, in_axes=in_axes)(state, teacher, images, labels, poisoned, order,
                                             keys, *step)
  return stacked


def fit(model: nn.Module, cfg, images: np.ndarray, labels: np.ndarray,
        key: jax.Array, on_epoch: Callable[[int, float, float], None] | None = None) -> dict:
  """Trains `model` from a fresh initialisation on clean data with cross-entropy.

  The inputs are scaled to [0, 1] (pixels / 255), without a trigger; SGD as
  `make_optimizer` builds it from `cfg`. Used for models an attack needs (CL's
  surrogate), handed to `attacks.build_attack` as its `fit`.

  Args:
    model: a Flax module of the registry.
    cfg: epochs, batch_size, learning_rate, lr_boundaries, lr_decay, momentum,
      nesterov, weight_decay, crop_flip (random crop + flip).
    images: (N, H, W, C) uint8 images in [0, 255].
    labels: (N,) int32 labels.
    key: PRNG key for the initialisation, the shuffling and the augmentation.
    on_epoch: called after each epoch with (epoch, 1-based; its mean cross-entropy;
      its seconds), e.g. to report progress; None: silent.

  Returns:
    The trained {'params', 'batch_stats'}, replicated on all devices.
  """
  mesh = make_mesh()
  tx = make_optimizer(cfg, len(images) // cfg.batch_size)
  k_init, k_train = jax.random.split(key)
  state = replicate(init_state(model, tx, k_init, images.shape[1:]), mesh)
  on_device = replicate((images, labels, np.zeros(len(images), bool)), mesh)
  run_epoch = TrainEpoch(model, tx, mesh, Recipe(cfg.batch_size, cfg.crop_flip),
                         normalizer(None, None), None)
  for epoch in range(cfg.epochs):
    start = time.perf_counter()
    state, losses = run_epoch(state, {}, *on_device, jax.random.fold_in(k_train, epoch))
    if on_epoch is not None:
      on_epoch(epoch + 1, float(np.mean(jax.device_get(losses['ce']))),
               time.perf_counter() - start)
  return state.variables

# ---------------------------------------------------------------------------- evaluation

class TestSet(NamedTuple):
  """The clean test split and the backdoor test images, each padded to whole evaluation batches.

  B = ceil(N / batch) clean batches, B' = ceil(N' / batch') backdoor batches, where a
  set smaller than the evaluation batch takes a smaller one (its size rounded up to a
  multiple of the device count); the `valid` masks are False on the zero padding.

  Attributes:
    images: (B, batch, H, W, C) uint8 clean test images.
    labels: (B, batch) int32 their true labels.
    valid: (B, batch) bool.
    backdoor_images: (B', batch', H, W, C) uint8: for an attack with a trigger the
      clean test images whose backdoor label differs from their label (triggered
      at evaluation; for all-to-one the non-target ones), for an attack with a
      given poisoned test set (`Attack.test_set`) its images.
    backdoor_labels: (B', batch') int32 their backdoor labels.
    true_labels: (B', batch') int32 their true labels.
    backdoor_valid: (B', batch') bool.
  """
  images: jax.Array
  labels: jax.Array
  valid: jax.Array
  backdoor_images: jax.Array
  backdoor_labels: jax.Array
  true_labels: jax.Array
  backdoor_valid: jax.Array


def _batched(batch_size: int, multiple: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Arrays of N rows -> zero-padded (ceil(N / b), b, ...) arrays and a valid mask, where
  b = min(batch_size, N rounded up to a multiple of `multiple`): a set smaller than one
  batch is not padded to a whole batch of zeros that would be evaluated too."""
  count = len(arrays[0])
  batch_size = min(batch_size, max(multiple, -(-count // multiple) * multiple))
  batches = -(-count // batch_size)
  pad = batches * batch_size - count
  shape = lambda x: x.reshape(batches, batch_size, *x.shape[1:])
  padded = [shape(np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])) for x in arrays]
  return (*padded, shape(np.arange(batches * batch_size) < count))


def make_test_set(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  mesh: jax.sharding.Mesh, attack: Attack) -> TestSet:
  """The clean test split and the attack's backdoor test images, batched and replicated on the mesh.

  Built once: the images whose backdoor label equals their label (for all-to-one,
  the target class) are left out of the backdoor set, so that the evaluation
  triggers only the images its asr and ra count.

  Args:
    images: (N, H, W, C) uint8 test images in [0, 255].
    labels: (N,) int32 labels.
    batch_size: the evaluation batch size (a multiple of the mesh's device count).
    mesh: the device mesh.
    attack: its `test_set` where it has one (used as given), else its `relabel`
      picks the clean images to trigger.

  Returns:
    A TestSet; padding has valid False.
  """
  if attack.test_set is not None:
    given = attack.test_set
    backdoor = (given.images, np.asarray(given.labels, np.int32),
                np.asarray(given.original_labels, np.int32))
  else:
    targets = np.asarray(attack.relabel(labels)).astype(np.int32)
    keep = targets != labels
    backdoor = (images[keep], targets[keep], np.asarray(labels, np.int32)[keep])
  devices = mesh.shape['data']  # every batch splits evenly over the devices
  return replicate(TestSet(*_batched(batch_size, devices, images, np.asarray(labels, np.int32)),
                           *_batched(batch_size, devices, *backdoor)), mesh)


def make_evaluate(model: nn.Module, mesh: jax.sharding.Mesh,
                  normalize: Callable[[jax.Array], jax.Array], attack: Attack,
                  scan: bool | None = None, replicas: bool = False) -> Callable[..., dict]:
  """Returns evaluate(variables, test_set, key) -> dict of acc, acc_nontarget, asr, ra (percent).

  acc: clean accuracy on the whole test set. acc_nontarget: clean accuracy on the
  images whose backdoor label differs from their true label (the official code's
  figure). On the backdoor test images (`TestSet.backdoor_*`: those non-target
  images, triggered here, or the attack's given poisoned images): asr, the share
  classified as the backdoor label, and ra (robust accuracy), the share
  classified as the true label. One clean forward per test image and one
  triggered forward per backdoor test image.

  Args:
    model: the Flax module.
    mesh: the mesh whose 'data' axis shards each batch.
    normalize: `normalizer`'s function, applied after the trigger.
    attack: supplies relabel and the trigger (None: the backdoor test images are
      used as they are).
    scan: one jitted lax.map over the batches if True, one call per batch if
      False; None: `scan_by_default()`.
    replicas: evaluate a stack of K replicas (`TrainEpoch`'s replicas): the
      variables and the key carry a leading axis of size K, and so does each metric
      returned; the test set is shared. With `scan`, one vmapped program; without
      (CPU), one replica after another.

  Returns:
    evaluate(variables, test_set, key): variables {'params', 'batch_stats'}, a
    `TestSet` from `make_test_set` with the same attack, a PRNG key for the
    triggers (split per backdoor batch); it returns {'acc', 'acc_nontarget',
    'asr', 'ra'} float32 scalars in [0, 100] (acc_nontarget NaN where no test
    image has a backdoor label other than its own, asr and ra NaN where the
    backdoor test set is empty).
  """
  batch_sharding = NamedSharding(mesh, P('data'))

  def predict(variables, images):
    x = jax.lax.with_sharding_constraint(images, batch_sharding)
    return jnp.argmax(model.apply(variables, normalize(x), train=False), -1)

  def clean_counts(variables, images, labels, valid):
    correct = predict(variables, images.astype(jnp.float32)) == labels
    nontarget = valid & (attack.relabel(labels) != labels)
    return jnp.stack([jnp.sum(valid & correct), jnp.sum(valid),
                      jnp.sum(nontarget & correct), jnp.sum(nontarget)])

  def backdoor_counts(variables, images, labels, true_labels, valid, key):
    x = images.astype(jnp.float32)
    if attack.trigger is not None:
      x = attack.trigger(jax.lax.with_sharding_constraint(x, batch_sharding), key)
    predicted = predict(variables, x)
    return jnp.stack([jnp.sum(valid & (predicted == labels)),
                      jnp.sum(valid & (predicted == true_labels)), jnp.sum(valid)])

  def percentages(clean, backdoor):
    clean, backdoor = clean.astype(jnp.float32), backdoor.astype(jnp.float32)
    return {'acc': 100 * clean[..., 0] / clean[..., 1],
            'acc_nontarget': 100 * clean[..., 2] / clean[..., 3],
            'asr': 100 * backdoor[..., 0] / backdoor[..., 2],
            'ra': 100 * backdoor[..., 1] / backdoor[..., 2]}

  options = cpu_compiler_options(training=False)

  def evaluate_batches(variables, test_set: TestSet, key):
    clean = jax.lax.map(lambda b: clean_counts(variables, *b), tuple(test_set[:3]))
    keys = jax.random.split(key, test_set.backdoor_labels.shape[0])
    backdoor = jax.lax.map(lambda b: backdoor_counts(variables, *b), (*test_set[3:], keys))
    return percentages(jnp.sum(clean, axis=0), jnp.sum(backdoor, axis=0))

  clean_batch = jax.jit(lambda variables, t, i: clean_counts(
      variables, t.images[i], t.labels[i], t.valid[i]), compiler_options=options)
  backdoor_batch = jax.jit(lambda variables, t, keys, i: backdoor_counts(
      variables, t.backdoor_images[i], t.backdoor_labels[i], t.true_labels[i],
      t.backdoor_valid[i], keys[i]), compiler_options=options)

  def evaluate_looped(variables, test_set: TestSet, key):
    keys = jax.random.split(key, test_set.backdoor_labels.shape[0])
    clean = sum((clean_batch(variables, test_set, i) for i in range(test_set.labels.shape[0])),
                jnp.zeros(4, jnp.int32))
    backdoor = sum((backdoor_batch(variables, test_set, keys, i) for i in range(len(keys))),
                   jnp.zeros(3, jnp.int32))
    return percentages(clean, backdoor)

  def evaluate_each(variables, test_set: TestSet, keys):
    # One replica after another: a CPU gains nothing from stacking them, and a vmapped
    # evaluation took 1.7x the time per replica for WRN-16-1 (docs/seeds.md).
    each = [evaluate_looped(jax.tree.map(lambda x: x[k], variables), test_set, keys[k])
            for k in range(keys.shape[0])]
    return jax.tree.map(lambda *m: jnp.stack(m), *each)

  if scan_by_default() if scan is None else scan:
    return jax.jit(jax.vmap(evaluate_batches, in_axes=(0, None, 0)) if replicas
                   else evaluate_batches, compiler_options=options)
  return evaluate_each if replicas else evaluate_looped
