"""Jitted training epochs and evaluation, data-parallel over a device mesh.

The training set lives on the devices for the whole stage. One call of the
compiled epoch shuffles it, and a lax.scan over its steps gathers each batch,
poisons, augments, runs the student (and the frozen teacher) and updates: one
dispatch per epoch. Batches are sharded over the mesh's 'data' axis; the state
is replicated, so XLA inserts the gradient all-reduce and BatchNorm sees the
global batch, exactly as on one device.
"""

import functools
from collections.abc import Sequence
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
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
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
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
  """Places host arrays on every device of the mesh (works across hosts too)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def normalizer(mean: Sequence[float] | None, std: Sequence[float] | None):
  """Maps float pixels in [0, 255] to the model's input scale: [0, 1], then (x-mean)/std."""
  def normalize(images):
    images = images / 255.0
    if mean is not None:
      images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return images
  return normalize


# ------------------------------------------------------------------------------ training

def make_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with PyTorch-style coupled weight decay and a per-epoch step schedule."""
  schedule = optax.piecewise_constant_schedule(
      cfg.learning_rate,
      {int(epoch) * steps_per_epoch: cfg.lr_decay for epoch in cfg.lr_boundaries})
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


def init_state(model: nn.Module, tx, key, image_shape) -> TrainState:
  variables = model.init(key, jnp.zeros((1, *image_shape)), train=False)
  return state_from_variables(variables, tx)


def state_from_variables(variables, tx) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def scan_by_default() -> bool:
  """Whether one dispatch per epoch (lax.scan over steps) pays on this backend.

  On accelerators it removes per-step dispatch. XLA:CPU runs convolutions
  inside a while loop about 20x slower than at the top level (15 vs 320 img/s
  for WRN-16-1), so on CPU each step is its own dispatch.
  """
  return jax.default_backend() != 'cpu'


def cpu_compiler_options(training: bool) -> dict[str, str]:
  """XLA:CPU options that the benchmarks measured fastest (benchmarks/README.md).

  In training, YNNPACK runs the large reductions (BatchNorm statistics and their
  gradients) about 8x faster than XLA's own loops: +25% img/s for WRN-16-1 on 2
  cores. Its other fusions (convolutions, element-wise) are slower than XLA's,
  and in evaluation, which has no large reductions, every YNNPACK fusion costs
  time. Other backends get no options.
  """
  if jax.default_backend() != 'cpu':
    return {}
  return {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE' if training else ''}


def make_loss(model: nn.Module, recipe: Recipe):
  """loss(params, batch_stats, teacher, x, y) -> (total, (batch_stats, ce, at per layer)).

  Cross-entropy, plus sum(betas * AT) against the frozen teacher when a beta is non-zero.
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

  def __init__(self, model: nn.Module, tx, mesh, recipe: Recipe, normalize,
               attack: Attack | None, scan: bool | None = None):
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

  def compile(self, state, teacher, images, labels, poisoned) -> None:
    """Compiles ahead of time for these shapes; later calls reuse the executables."""
    # Calling the schedule once compiles it, so that the first epoch compiles nothing.
    order, keys = self._schedule(jax.random.key(0), images.shape[0])
    extra = () if self.scan else (0,)
    self._update = self._update.lower(state, teacher, images, labels, poisoned, order, keys,
                                      *extra).compile()

  def __call__(self, state, teacher, images, labels, poisoned, key):
    order, keys = self._schedule(key, images.shape[0])
    if self.scan:  # one dispatch, which also averages the steps' metrics
      return self._update(state, teacher, images, labels, poisoned, order, keys)
    per_step = []
    for i in range(order.shape[0]):
      state, m = self._update(state, teacher, images, labels, poisoned, order, keys, i)
      per_step.append(m)
    return state, jax.tree.map(lambda *m: jnp.mean(jnp.stack(m), axis=0), *per_step)


# ---------------------------------------------------------------------------- evaluation

class TestSet(NamedTuple):
  """The test split padded to whole evaluation batches; `valid` marks real samples."""
  images: jax.Array  # (batches, batch, H, W, C) uint8
  labels: jax.Array  # (batches, batch) int32
  valid: jax.Array   # (batches, batch) bool


def make_test_set(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> TestSet:
  batches = -(-len(images) // batch_size)
  pad = batches * batch_size - len(images)
  shape = lambda x: x.reshape(batches, batch_size, *x.shape[1:])
  return replicate(TestSet(
      shape(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])),
      shape(np.concatenate([labels, np.zeros(pad, labels.dtype)])),
      shape(np.arange(batches * batch_size) < len(images))), mesh)


def make_evaluate(model: nn.Module, mesh, normalize, attack: Attack, scan: bool | None = None):
  """Returns evaluate(variables, test_set, key) -> dict of acc, acc_nontarget, asr (percent).

  acc: clean accuracy on the whole test set. acc_nontarget: clean accuracy on the
  images whose backdoor label differs from their true label (the official code's
  figure). asr: share of those images, triggered, classified as the backdoor label.
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
