"""Figures (PNG, matplotlib's Agg backend; matplotlib is imported only here).

- `attention`: the attention maps of the distilled layers for a few triggered
  test images, side by side for several models (the paper's attention figure:
  backdoored, teacher, NAD).
- `defense_curves`: ACC and ASR per epoch of each defense.
- `mcr_curves`: ACC and ASR along the MCR curve, t from 0 to 1.
"""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nad_jax import streams
from nad_jax.attention import attention_map

if TYPE_CHECKING:  # annotations only: figures.py imports no attack code at run time
  from nad_jax.attacks.core import Attack


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def triggered_examples(attack: 'Attack', images: np.ndarray, labels: np.ndarray, count: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The first `count` test images whose backdoor label differs from theirs, triggered.

  Args:
    attack: supplies the trigger and relabel; one without a trigger (attack 'files')
      supplies its poisoned test images instead, and `images`, `labels` are unused.
    images: (N, H, W, C) uint8 test images in [0, 255].
    labels: (N,) int32 labels.
    count: at most this many images.
    seed: the run's seed; the triggers draw from streams.key(seed, 'evaluation').

  Returns:
    (triggered (M, H, W, C) float32 in [0, 255], true labels (M,), backdoor
    labels (M,)), M <= count.
  """
  if attack.trigger is None:  # poisoned test images given as files (attacks/files.py)
    given = attack.test_set
    return (np.asarray(given.images[:count], np.float32),
            np.asarray(given.original_labels[:count]), np.asarray(given.labels[:count]))
  labels = np.asarray(labels)
  targets = np.asarray(attack.relabel(jnp.asarray(labels)))
  index = np.flatnonzero(targets != labels)[:count]
  x = jnp.asarray(images[index], jnp.float32)
  triggered = attack.trigger(x, streams.key(seed, 'evaluation'))
  return np.asarray(triggered), labels[index], targets[index]


def attention_maps(model: nn.Module, variables: dict, images: np.ndarray,
                   normalize: Callable[[jax.Array], jax.Array], layers: Sequence[str],
                   p: float = 2.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """{layer: (N, H, W) attention maps} of float `images` in [0, 255], and the predictions.

  Args:
    model: the Flax module.
    variables: its {'params', 'batch_stats'}.
    images: (N, H, W, C) pixels in [0, 255].
    normalize: `train.normalizer`'s function.
    layers: names the model sows into 'intermediates'.
    p: the attention exponent (`attention.attention_map`).

  Returns:
    ({layer: (N, h, w) float32 maps at that layer's resolution, each map with
    L2 norm ~1}, (N,) predicted classes).
  """
  logits, sown = model.apply(variables, normalize(jnp.asarray(images, jnp.float32)),
                             train=False, mutable=['intermediates'])
  maps = {}
  for layer in layers:
    features = sown['intermediates'][layer][0]
    maps[layer] = np.asarray(attention_map(features, p)).reshape(features.shape[:3])
  return maps, np.asarray(jnp.argmax(logits, -1))


def attention(path: str, model: nn.Module, models: dict, images: np.ndarray,
              normalize: Callable[[jax.Array], jax.Array], layers: Sequence[str],
              p: float = 2.0, title: str = '') -> None:
  """One row per image: the triggered input, then each model's map at each layer.

  The paper's attention figure (Li et al., ICLR 2021): backdoored, teacher, NAD.

  Args:
    path: the PNG file to write.
    model: the Flax module all `models` share.
    models: {column title: variables}, in column order.
    images: (N, H, W, C) triggered images in [0, 255] (e.g. `triggered_examples`).
    normalize: `train.normalizer`'s function.
    layers: the sown layers to show.
    p: the attention exponent.
    title: a figure title; '' for none.
  """
  plt = _pyplot()
  results = {name: attention_maps(model, v, images, normalize, layers, p)
             for name, v in models.items()}
  rows, cols = len(images), 1 + len(models) * len(layers)
  fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.15 * rows + 0.5), squeeze=False)
  for r in range(rows):
    axes[r, 0].imshow(np.clip(images[r], 0, 255).astype(np.uint8))
    c = 1
    for name, (maps, predictions) in results.items():
      for layer in layers:
        axes[r, c].imshow(maps[layer][r], cmap='jet', interpolation='bilinear')
        if layer == layers[-1]:
          axes[r, c].set_xlabel(f'pred {predictions[r]}', fontsize=6, labelpad=1)
        c += 1
  axes[0, 0].set_title('triggered', fontsize=7)
  c = 1
  for name in results:
    for layer in layers:
      axes[0, c].set_title(f'{name}\n{layer}', fontsize=7)
      c += 1
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97 if title else 1))
  fig.savefig(path, dpi=80)
  plt.close(fig)


def defense_curves(path: str, histories: dict, title: str = '') -> None:
  """ACC (left) and ASR (right) per evaluated epoch, one line per defense ({name: history}).

  Args:
    path: the PNG file to write.
    histories: {defense name: list of per-epoch dicts}; those with 'acc' are
      plotted, and need 'epoch', 'acc' and 'asr' (percentages in [0, 100]).
    title: a figure title; '' for none.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8))
  for name, history in histories.items():
    history = [h for h in history if 'acc' in h]
    epochs = [h['epoch'] for h in history]
    for ax, metric in zip(axes, ('acc', 'asr')):
      ax.plot(epochs, [h[metric] for h in history], marker='.', label=name)
  for ax, label in zip(axes, ('clean accuracy (%)', 'attack success rate (%)')):
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def mcr_curves(path: str, curves: dict, t: float | None = None) -> None:
  """ACC (dashed) and ASR (solid) along the curve, one colour per attack ({name: curve}).

  Args:
    path: the PNG file to write.
    curves: {attack name: list of dicts with 't' in [0, 1] and 'acc', 'asr'
      percentages in [0, 100]}.
    t: the chosen point on the curve, marked by a vertical line; None: no line.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3))
  for i, (name, curve) in enumerate(curves.items()):
    ts = [c['t'] for c in curve]
    color = f'C{i}'
    ax.plot(ts, [c['asr'] for c in curve], '-o', color=color, markersize=3, label=f'{name} ASR')
    ax.plot(ts, [c['acc'] for c in curve], '--', color=color, label=f'{name} ACC')
  if t is not None:
    ax.axvline(t, color='gray', lw=0.8)
  ax.set_xlabel('t (0: backdoored, 1: fine-tuned)')
  ax.set_ylabel('%')
  ax.set_ylim(-3, 103)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  ax.set_title('Mode connectivity repair: the Bezier curve', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
