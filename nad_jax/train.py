"""Jitted training epochs and evaluation, data-parallel over a device mesh.

The training set lives on the devices for the whole stage. One call of the
compiled epoch shuffles it, and a lax.scan over its steps gathers each batch,
poisons, augments, runs the student (and the frozen teacher) and updates: one
dispatch per epoch. Batches are sharded over the mesh's 'data' axis; the state
is replicated, so XLA inserts the gradient all-reduce and BatchNorm sees the
global batch, exactly as on one device.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nad_jax import data as data_lib
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

def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay and a per-epoch step schedule.

  Weight decay is added to the gradient before momentum (torch.optim.SGD's
  weight_decay); the learning rate is multiplied by `lr_decay` at each boundary.

  Args:
    cfg: a stage's optimiser config with learning_rate, lr_boundaries (epochs),
      lr_decay, weight_decay, momentum (0 or None: plain SGD) and nesterov.
    steps_per_epoch: optimiser steps per epoch, to turn epochs into steps.

  Returns:
    The optax transformation.
  """
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
  variables = model.init(key, jnp.zeros((1, *image_shape)), train=False)
  return state_from_variables(variables, tx)


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
  """loss(params, batch_stats, teacher, x, y) -> (total, (batch_stats, ce, at per layer)).

  Cross-entropy, plus sum(betas * AT) against the frozen teacher when a beta is non-zero.
  This is NAD's objective (Li et al., ICLR 2021), with the AT loss of `attention.at_loss`.

  Args:
    model: the student's Flax module (the teacher shares it).
    recipe: supplies betas, layers (sown names) and p.

  Returns:
    loss(params, batch_stats, teacher, x, y): teacher is the teacher's variables
    (unused without distillation), x (N, H, W, C) normalised float32 inputs, y (N,)
    int32 labels; it returns (total float32 scalar, (new batch_stats, mean CE
    float32 scalar, (len(betas),) float32 AT losses, zeros without distillation)).
  """
  distill = any(recipe.betas)
  betas = jnp.asarray(recipe.betas, jnp.float32)

  def loss(params, batch_stats, teacher, x, y):
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
  gradient. `compile(...)` compiles ahead of time so that its cost is known.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, recipe: Recipe,
               normalize: Callable[[jax.Array], jax.Array],
               attack: Attack | None, scan: bool | None = None):
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
    """
    self.recipe = recipe
    self.scan = scan_by_default() if scan is None else scan
    batch_sharding = NamedSharding(mesh, P('data'))
    loss_fn = make_loss(model, recipe)

    def step(state, teacher, images, labels, poisoned, order, keys, i):
      indices, key = order[i], keys[i]
      k_trigger, k_augment = jax.random.split(key)
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
          state.params, state.batch_stats, teacher, x, y)
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

    self._schedule = jax.jit(schedule, static_argnums=1)
    self._update = jax.jit(scan_steps if self.scan else step, donate_argnums=0,
                           compiler_options=cpu_compiler_options(training=True))

  def compile(self, state: TrainState, teacher: Any, images: jax.Array, labels: jax.Array,
              poisoned: jax.Array) -> None:
    """Compiles ahead of time for these shapes; later calls reuse the executables.

    Args:
      state, teacher, images, labels, poisoned: as for `__call__` (the key is not
        needed); only their shapes, dtypes and shardings matter.
    """
    # Calling the schedule once compiles it, so that the first epoch compiles nothing.
    order, keys = self._schedule(jax.random.key(0), images.shape[0])
    extra = () if self.scan else (0,)
    self._update = self._update.lower(state, teacher, images, labels, poisoned, order, keys,
                                      *extra).compile()

  def __call__(self, state: TrainState, teacher: Any, images: jax.Array, labels: jax.Array,
               poisoned: jax.Array, key: jax.Array) -> tuple[TrainState, dict]:
    """Runs one epoch over a fresh shuffle; the last partial batch is dropped.

    Args:
      state: the replicated TrainState; donated (do not reuse it after the call).
      teacher: the teacher's {'params', 'batch_stats'}, or {} without distillation.
      images: (N, H, W, C) uint8 training images in [0, 255], on the devices.
      labels: (N,) int32 labels.
      poisoned: (N,) bool, True where the attack triggers and relabels.
      key: PRNG key of the epoch's shuffle, augmentation and triggers.

    Returns:
      (new state, {'ce': float32 scalar, 'at': (len(betas),) float32}), the
      metrics averaged over the epoch's steps.
    """
    order, keys = self._schedule(key, images.shape[0])
    if self.scan:  # one dispatch, which also averages the steps' metrics
      return self._update(state, teacher, images, labels, poisoned, order, keys)
    per_step = []
    for i in range(order.shape[0]):
      state, m = self._update(state, teacher, images, labels, poisoned, order, keys, i)
      per_step.append(m)
    return state, jax.tree.map(lambda *m: jnp.mean(jnp.stack(m), axis=0), *per_step)



def fit(model: nn.Module, cfg, images: np.ndarray, labels: np.ndarray,
        key: jax.Array) -> dict:
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
    state, _ = run_epoch(state, {}, *on_device, jax.random.fold_in(k_train, epoch))
  return state.variables

# ---------------------------------------------------------------------------- evaluation

class TestSet(NamedTuple):
  """The test split padded to whole evaluation batches; `valid` marks real samples."""
  images: jax.Array  # (batches, batch, H, W, C) uint8
  labels: jax.Array  # (batches, batch) int32
  valid: jax.Array   # (batches, batch) bool


def make_test_set(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  mesh: jax.sharding.Mesh) -> TestSet:
  """Pads the test split with zeros to whole batches and replicates it on the mesh.

  Args:
    images: (N, H, W, C) uint8 test images in [0, 255].
    labels: (N,) int32 labels.
    batch_size: the evaluation batch size.
    mesh: the device mesh.

  Returns:
    A TestSet of ceil(N / batch_size) batches; padding has valid False.
  """
  batches = -(-len(images) // batch_size)
  pad = batches * batch_size - len(images)
  shape = lambda x: x.reshape(batches, batch_size, *x.shape[1:])
  return replicate(TestSet(
      shape(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])),
      shape(np.concatenate([labels, np.zeros(pad, labels.dtype)])),
      shape(np.arange(batches * batch_size) < len(images))), mesh)


def make_evaluate(model: nn.Module, mesh: jax.sharding.Mesh,
                  normalize: Callable[[jax.Array], jax.Array], attack: Attack,
                  scan: bool | None = None) -> Callable[..., dict]:
  """Returns evaluate(variables, test_set, key) -> dict of acc, acc_nontarget, asr (percent).

  acc: clean accuracy on the whole test set. acc_nontarget: clean accuracy on the
  images whose backdoor label differs from their true label (the official code's
  figure). asr: share of those images, triggered, classified as the backdoor label.

  Args:
    model: the Flax module.
    mesh: the mesh whose 'data' axis shards each batch.
    normalize: `normalizer`'s function, applied after the trigger.
    attack: supplies the trigger and relabel.
    scan: one jitted lax.map over the batches if True, one call per batch if
      False; None: `scan_by_default()`.

  Returns:
    evaluate(variables, test_set, key): variables {'params', 'batch_stats'}, a
    `TestSet`, a PRNG key for the triggers (split per batch); it returns
    {'acc', 'acc_nontarget', 'asr'} float32 scalars in [0, 100] (NaN for the
    last two where no test image has a backdoor label other than its own).
  """
  batch_sharding = NamedSharding(mesh, P('data'))

  def counts(variables, batch, key):
    images, labels, valid = batch
    x = jax.lax.with_sharding_constraint(images.astype(jnp.float32), batch_sharding)
    predict = lambda x: jnp.argmax(model.apply(variables, normalize(x), train=False), -1)
    clean = predict(x)
    triggered = predict(attack.trigger(x, key))
    target = attack.relabel(labels)
    nontarget = valid & (target != labels)
    return jnp.stack([jnp.sum(valid & (clean == labels)), jnp.sum(valid),
                      jnp.sum(nontarget & (clean == labels)), jnp.sum(nontarget),
                      jnp.sum(nontarget & (triggered == target))])

  def percentages(c):
    c = c.astype(jnp.float32)
    return {'acc': 100 * c[0] / c[1], 'acc_nontarget': 100 * c[2] / c[3],
            'asr': 100 * c[4] / c[3]}

  options = cpu_compiler_options(training=False)

  @functools.partial(jax.jit, compiler_options=options)
  def evaluate_scanned(variables, test_set: TestSet, key):
    keys = jax.random.split(key, test_set.labels.shape[0])
    per_batch = jax.lax.map(lambda b: counts(variables, b[:3], b[3]), (*test_set, keys))
    return percentages(jnp.sum(per_batch, axis=0))

  batch_counts = jax.jit(lambda variables, test_set, keys, i: counts(
      variables, (test_set.images[i], test_set.labels[i], test_set.valid[i]), keys[i]),
      compiler_options=options)

  def evaluate_looped(variables, test_set: TestSet, key):
    keys = jax.random.split(key, test_set.labels.shape[0])
    total = sum(batch_counts(variables, test_set, keys, i) for i in range(len(keys)))
    return percentages(total)

  use_scan = scan_by_default() if scan is None else scan
  return evaluate_scanned if use_scan else evaluate_looped
