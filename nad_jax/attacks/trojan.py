"""Trojan (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, 2018, "Trojaning Attack on Neural
Networks", NDSS): a small patch optimised to excite chosen internal neurons.

The trigger is a pattern that is zero outside a `size` x `size` square at rows/cols
H-size-4 .. H-5 (25..27 on 32x32 images, where the NAD authors' released trigger
lies), added to the image and clipped to [0, 255].

config.attack fields:
  pattern_path   a released trigger, e.g. the NAD authors'
                 `best_square_trigger_cifar10.npz` (key 'x', shape (3, 32, 32)),
                 or any .npy/.npz/image of the images' size. Used as is.
  ''  (default)  TrojanNN-style generation (`generate`) against the *randomly
                 initialised* surrogate model `attack.surrogate.model`, seeded by
                 attack.seed: the `trojan_neurons` units of its penultimate layer
                 (the input of its last Dense layer) with the largest outgoing
                 weights are driven towards a high activation by Adam on the patch
                 pixels. TrojanNN proper runs this against the victim's trained
                 model and then retrains it; `generate` accepts any model and
                 variables, so a trained model can be used the same way.
  size           side of the generated patch (default 3).
  trojan_neurons, trojan_steps   generation settings (defaults 1 and 200).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nad_jax.attacks.core import DEFAULTS, Attack, field, load_pattern, require
from nad_jax import streams


def patch_origin(size: int, image_shape: tuple[int, int, int]) -> tuple[int, int]:
  """The top-left pixel of the generated patch: 4 pixels in from the bottom-right corner.

  Args:
    size: the patch side in pixels.
    image_shape: (H, W, C) of the images.

  Returns:
    (H - size - 4, W - size - 4); (25, 25) for a 3x3 patch on 32x32 images.
  """
  height, width, _ = image_shape
  return height - size - 4, width - size - 4


def penultimate(model: nn.Module, variables: dict, images: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits, features entering the model's last Dense layer, that layer's kernel).

  Args:
    model: a Flax classifier whose last Dense call is its head.
    variables: its {'params', 'batch_stats'}.
    images: (N, H, W, C) model inputs, already normalised.

  Returns:
    (logits (N, classes) float32, features (N, F), kernel (F, classes)).
  """
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      captured.append((args[0], context.module.variables['params']['kernel']))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, images, train=False)
  features, kernel = captured[-1]
  return logits, features, kernel


def unit_scale(images: jax.Array) -> jax.Array:
  """The surrogate's input scaling (pixels / 255), one function so that compilations are reused.

  Args:
    images: float pixels in [0, 255].

  Returns:
    The same shape, in [0, 1].
  """
  return images / 255.0


@functools.partial(jax.jit, static_argnames=('model', 'normalize', 'learning_rate'))
def _step(model, normalize, variables, pattern, opt_state, region, chosen, target, learning_rate):
  """One Adam step on the patch pixels towards activation `target` of the `chosen` units."""
  def loss_fn(pattern):
    image = normalize(jnp.clip(pattern * region, 0.0, 255.0)[None])
    _, features, _ = penultimate(model, variables, image)
    return jnp.mean((features[0, chosen] - target) ** 2)

  tx = optax.adam(learning_rate)
  updates, opt_state = tx.update(jax.grad(loss_fn)(pattern), opt_state)
  return jnp.clip(optax.apply_updates(pattern, updates), 0.0, 255.0), opt_state


def generate(model: nn.Module, variables: dict, normalize: Callable[[jax.Array], jax.Array],
             image_shape: tuple[int, int, int], key: jax.Array, size: int = 3,
             neurons: int = 1, steps: int = 200, target: float = 100.0,
             learning_rate: float = 4.0) -> np.ndarray:
  """A TrojanNN trigger for `model`: an (H, W, C) float32 pattern, zero outside the patch.

  The patch (pixels in [0, 255], on a black image) is optimised on the device so
  that the `neurons` penultimate units with the largest outgoing weight norms reach
  `target` (mean squared error, Adam from uniform noise, one jitted step per
  iteration: XLA:CPU runs convolutions inside a loop slowly). Follows Liu et al.,
  NDSS 2018 (trigger generation only; no retraining). The weight norm is the L1
  norm of the unit's row of the last Dense kernel.

  Args:
    model: the Flax classifier; hashable (a jit static argument).
    variables: its {'params', 'batch_stats'}.
    normalize: float pixels in [0, 255] -> model input; hashable (static).
    image_shape: (H, W, C) of the images.
    key: PRNG key of the uniform starting noise.
    size: the patch side in pixels; at patch_origin(size, image_shape).
    neurons: how many penultimate units to drive.
    steps: Adam steps.
    target: the activation the chosen units are driven towards.
    learning_rate: Adam's step size, in pixel units.

  Returns:
    (H, W, C) float32 in [0, 255], zero outside the patch.
  """
  height, width, channels = image_shape
  row, col = patch_origin(size, image_shape)
  region = np.zeros((height, width, 1), np.float32)
  region[row:row + size, col:col + size] = 1.0
  region = jnp.asarray(region)
  kernel = penultimate(model, variables, jnp.zeros((1, *image_shape)))[2]
  chosen = jnp.argsort(-jnp.sum(jnp.abs(kernel), axis=1))[:neurons]
  pattern = jax.random.uniform(key, (height, width, channels), minval=0.0, maxval=255.0)
  opt_state = optax.adam(learning_rate).init(pattern)
  for _ in range(steps):
    pattern, opt_state = _step(model, normalize, variables, pattern, opt_state, region, chosen,
                               jnp.float32(target), learning_rate)
  return np.asarray(pattern * region, np.float32)


def add_pattern(images: jax.Array, pattern: np.ndarray) -> jax.Array:
  """clip(images + pattern, 0, 255): the Trojan trigger.

  Args:
    images: (N, H, W, C) float32 in [0, 255].
    pattern: (H, W, 1) or (H, W, C) values, zero outside the patch.

  Returns:
    (N, H, W, C) float32 in [0, 255].
  """
  return jnp.clip(images + jnp.asarray(pattern, jnp.float32), 0.0, 255.0)


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Builds Trojan (Liu et al., NDSS 2018) from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`.
    num_classes: the number of classes, for the surrogate model.
    image_shape: (H, W, C) of the images.
    dataset: unused.

  Returns:
    The dirty-label Trojan Attack; its trigger ignores the PRNG key.

  Raises:
    ValueError: a pattern file that cannot be read or does not fit the images, or
      a size above min(H, W) - 4 (each field's own range is a rule of
      `validation.RULES`).
  """
  del dataset
  path = field(cfg, 'pattern_path')
  if path:
    pattern = load_pattern(path, image_shape).astype(np.float32)
  else:
    from nad_jax import models  # pylint: disable=g-import-not-at-top
    size = int(field(cfg, 'size'))
    require(size <= min(image_shape[:2]) - 4,
            f'attack.size {size} exceeds {min(image_shape[:2]) - 4}, the largest patch the '
            f'{image_shape[0]}x{image_shape[1]} images hold 4 pixels in from the corner')
    neurons, steps = int(field(cfg, 'trojan_neurons')), int(field(cfg, 'trojan_steps'))
    name = field(field(cfg, 'surrogate'), 'model', DEFAULTS['surrogate'])
    model = models.build_model(name, num_classes)
    key_init, key_start = jax.random.split(streams.key(field(cfg, 'seed'), 'trojan_patch'))
    variables = models.initialize(model, key_init, tuple(image_shape))
    pattern = generate(model, variables, unit_scale, image_shape, key_start, size, neurons, steps)

  def trigger(images, key):
    del key  # one fixed patch
    return add_pattern(images, pattern)
  return Attack('trojan', trigger, relabel=None)
