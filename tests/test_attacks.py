"""Each attack's trigger and poisoning against an independent NumPy implementation."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nad_cifar, quickstart
from nad_jax import data as data_lib
from nad_jax import defaults
from nad_jax import streams
from nad_jax.attacks import build_attack, poison_mask, prepare
from nad_jax.attacks import label_consistent, refool, sig, trojan, wanet

OFFICIAL = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'nad-official')
SHAPE = (32, 32, 3)
GRID = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 255]], np.float32)
# Refool as before its natural bank and selection: held-out training images, no training.
HELDOUT = dict(reflection_source='heldout', selection_rounds=0)


def attack_config(name, **overrides):
  config = defaults.paper_config().attack
  config.name = name
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(0, 255, (6, *SHAPE)).astype(np.float32)


@pytest.fixture(scope='module')
def dataset():
  return data_lib.synthetic(0, 400, 10)


def trigger(attack, x, key=None):
  key = jax.random.key(3) if key is None else key
  return np.asarray(jax.jit(attack.trigger)(jnp.asarray(x), key))


# --------------------------------------------------------------------- poisoning & labels

def test_dirty_label_poison_mask_and_relabel():
  labels = np.random.default_rng(1).integers(0, 10, 1000).astype(np.int32)
  attack = build_attack(attack_config('badnets'), 10, SHAPE)
  mask = poison_mask(labels, attack, 0.1, np.random.default_rng([0, 2]))
  expected = np.zeros(1000, bool)
  expected[np.random.default_rng([0, 2]).choice(1000, 100, replace=False)] = True
  np.testing.assert_array_equal(mask, expected)
  assert len(np.unique(labels[mask])) > 5  # every class, not only non-targets
  np.testing.assert_array_equal(np.asarray(attack.relabel(jnp.asarray(labels))), 5)
  all2all = build_attack(attack_config('badnets', mode='all_to_all'), 10, SHAPE)
  np.testing.assert_array_equal(np.asarray(all2all.relabel(jnp.asarray(labels))),
                                (labels + 1) % 10)


@pytest.mark.parametrize('name', ['sig', 'cl', 'refool'])
def test_clean_label_attacks_poison_only_the_target_class(name, dataset):
  attack = build_attack(attack_config(name, reflections=10, **HELDOUT), 10, SHAPE, dataset)
  assert attack.clean_label
  labels = dataset.train_labels
  mask = poison_mask(labels, attack, 0.8, np.random.default_rng([0, 2]))
  targets = np.flatnonzero(labels == 5)
  assert mask.sum() == round(0.8 * len(targets)) and np.all(labels[mask] == 5)
  # The labels the training step gives the poisoned samples are their own.
  np.testing.assert_array_equal(np.asarray(attack.relabel(jnp.asarray(labels[mask]))),
                                labels[mask])
  dirty = build_attack(attack_config(name, clean_label=False, reflections=10, **HELDOUT), 10,
                       SHAPE, dataset)
  assert not dirty.clean_label


def test_same_seed_same_poisoned_set(dataset):
  attack = build_attack(attack_config('blend'), 10, SHAPE)
  masks = [poison_mask(dataset.train_labels, attack, 0.1, np.random.default_rng([s, 2]))
           for s in (0, 0, 1)]
  np.testing.assert_array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[0], masks[2])


# ------------------------------------------------------------------------------- BadNets

@pytest.mark.parametrize('corner', ['bottom_right', 'bottom_left', 'top_right', 'top_left'])
def test_badnets_grid(images, corner):
  out = trigger(build_attack(attack_config('badnets', corner=corner), 10, SHAPE), images)
  expected = images.copy()
  rows = slice(29, 32) if corner.startswith('bottom') else slice(0, 3)
  cols = slice(29, 32) if corner.endswith('right') else slice(0, 3)
  expected[:, rows, cols, :] = GRID[None, :, :, None]
  np.testing.assert_array_equal(out, expected)


def test_badnets_square(images):
  out = trigger(build_attack(attack_config('badnets', pattern='square', size=5), 10, SHAPE),
                images)
  expected = images.copy()
  expected[:, 27:, 27:, :] = 255
  np.testing.assert_array_equal(out, expected)


# -------------------------------------------------------------------------------- Trojan

def test_trojan_from_file(images, tmp_path):
  pattern = np.zeros((3, 32, 32), np.float32)
  pattern[:, 25:28, 25:28] = np.random.default_rng(0).uniform(0, 250, (3, 3, 3))
  path = tmp_path / 'trigger.npz'
  np.savez(path, x=pattern)
  out = trigger(build_attack(attack_config('trojan', pattern_path=str(path)), 10, SHAPE), images)
  np.testing.assert_allclose(out, np.clip(images + pattern.transpose(1, 2, 0), 0, 255), atol=1e-4)


def test_trojan_official_trigger(images):
  path = os.path.join(OFFICIAL, 'best_square_trigger_cifar10.npz')
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  raw = np.load(path)['x']
  out = trigger(build_attack(attack_config('trojan', pattern_path=path), 10, SHAPE), images)
  np.testing.assert_allclose(out, np.clip(images + raw.transpose(1, 2, 0), 0, 255), atol=1e-4)
  changed = np.argwhere(np.any(out != images, axis=(0, 3)))
  assert changed.min() >= 25 and changed.max() <= 27


def test_trojan_generated_patch_is_local_and_seeded(monkeypatch):
  from nad_jax import models  # a registered surrogate that compiles fast
  monkeypatch.setitem(models.MODELS, 'global_linear', lambda **kwargs: GlobalLinear())
  config = attack_config('trojan', trojan_steps=5, surrogate=dict(model='global_linear'))
  zeros = np.zeros((1, *SHAPE), np.float32)
  first = trigger(build_attack(config, 10, SHAPE), zeros)[0]
  again = trigger(build_attack(config, 10, SHAPE), zeros)[0]
  config.seed = 1
  other = trigger(build_attack(config, 10, SHAPE), zeros)[0]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  outside = first.copy()
  outside[25:28, 25:28] = 0
  assert np.all(outside == 0) and first[25:28, 25:28].max() > 0 and first.max() <= 255


class GlobalLinear(nn.Module):
  """Global average pool -> Dense: its penultimate units are the channel means."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.mean((1, 2)))


def test_trojan_generation_drives_the_chosen_neuron():
  model = GlobalLinear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  pattern = trojan.generate(model, variables, lambda x: x / 255.0, SHAPE, jax.random.key(1),
                            steps=80)
  kernel = np.asarray(variables['params']['Dense_0']['kernel'])
  chosen = int(np.argmax(np.abs(kernel).sum(1)))  # the unit with the largest outgoing weights
  # Its activation grows with the patch's pixels in its channel: they go to the maximum.
  assert np.all(pattern[25:28, 25:28, chosen] > 250)


# --------------------------------------------------------------------------------- Blend

def test_blend_noise_pattern(images):
  out = trigger(build_attack(attack_config('blend'), 10, SHAPE), images)
  pattern = (out - 0.8 * images) / 0.2  # recover the pattern: it must be one fixed noise image
  np.testing.assert_allclose(pattern, np.broadcast_to(pattern[:1, :, :, :1], pattern.shape),
                             atol=2e-3)
  values = np.round(pattern[0, :, :, 0])
  assert values.min() >= 0 and values.max() <= 255 and len(np.unique(values)) > 200
  np.testing.assert_allclose(values, pattern[0, :, :, 0], atol=2e-3)  # integer grey levels
  again = trigger(build_attack(attack_config('blend'), 10, SHAPE), images)
  other = trigger(build_attack(attack_config('blend', seed=1), 10, SHAPE), images)
  np.testing.assert_array_equal(out, again)
  assert not np.allclose(out, other)


def test_blend_image_file(images, tmp_path):
  from PIL import Image
  picture = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
  Image.fromarray(picture).save(tmp_path / 'kitty.png')
  resized = np.asarray(Image.fromarray(picture).resize((32, 32), Image.BILINEAR), np.float32)
  attack = build_attack(attack_config('blend', alpha=0.3, pattern_path=str(tmp_path / 'kitty.png')),
                        10, SHAPE)
  np.testing.assert_allclose(trigger(attack, images), 0.7 * images + 0.3 * resized, atol=1e-3)


# ----------------------------------------------------------------------------------- SIG

def test_sig_generated(images):
  out = trigger(build_attack(attack_config('sig'), 10, SHAPE), images)
  j = np.arange(32)
  v = 20 * np.sin(2 * np.pi * j * 6 / 32)
  np.testing.assert_allclose(out, np.clip(images + v[None, None, :, None], 0, 255), atol=1e-3)
  blended = trigger(build_attack(attack_config('sig', sig_mode='blend', delta=30.0, frequency=4.0),
                                 10, SHAPE), images)
  v = 30 * np.sin(2 * np.pi * j * 4 / 32)
  np.testing.assert_allclose(blended, np.clip(0.8 * images + 0.2 * v[None, None, :, None], 0, 255),
                             atol=1e-3)


def test_sig_generated_blend_raw(images):
  attack = build_attack(attack_config('sig', sig_mode='blend_raw', frequency=4.5), 10, SHAPE)
  v = np.trunc(20 * np.sin(2 * np.pi * np.arange(32) * 4.5 / 32))
  stored = np.where(v < 0, v + 256, v)  # as a uint8 file holds it
  np.testing.assert_allclose(trigger(attack, images),
                             0.8 * images + 0.2 * stored[None, None, :, None], atol=1e-3)


def test_sig_official_mask(images):
  path = os.path.join(OFFICIAL, 'signal_cifar10_mask.npy')
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  raw = np.load(path)
  signed = np.where(raw > 127, raw.astype(np.int32) - 256, raw).astype(np.float32)
  assert signed.min() >= -20 and signed.max() <= 20  # a sinusoid of amplitude ~20
  np.testing.assert_array_equal(signed, np.broadcast_to(signed[:1], signed.shape))  # every row
  out = trigger(build_attack(attack_config('sig', pattern_path=path), 10, SHAPE), images)
  np.testing.assert_allclose(out, np.clip(images + signed[None, :, :, None], 0, 255), atol=1e-3)
  # The NAD code's arithmetic: (1 - 0.2) * img + 0.2 * mask, the mask read as uint8.
  raw_out = trigger(build_attack(attack_config('sig', pattern_path=path, sig_mode='blend_raw'),
                                 10, SHAPE), images)
  np.testing.assert_allclose(raw_out, 0.8 * images + 0.2 * raw[None, :, :, None].astype(np.float32),
                             atol=1e-3)
  # The released mask is the generated signal at the NAD code's frequency, truncated.
  generated = trigger(build_attack(attack_config('sig', sig_mode='blend_raw',
                                                 frequency=sig.NAD_CODE_FREQUENCY), 10, SHAPE),
                      images)
  np.testing.assert_array_equal(generated, raw_out)


# ------------------------------------------------------------------------------------ CL

def test_cl_four_corner_trigger(images):
  out = trigger(build_attack(attack_config('cl'), 10, SHAPE), images)
  expected = images.copy()
  expected[:, 29:, 29:, :] = GRID[:, :, None]
  expected[:, 29:, :3, :] = GRID[:, ::-1, None]
  expected[:, :3, 29:, :] = GRID[::-1, :, None]
  expected[:, :3, :3, :] = GRID[::-1, ::-1, None]
  np.testing.assert_array_equal(out, expected)
  flipped = trigger(build_attack(attack_config('cl'), 10, SHAPE), images[:, :, ::-1])
  np.testing.assert_array_equal(flipped[:, :, ::-1], out)  # survives horizontal flips
  half = trigger(build_attack(attack_config('cl', amplitude=64.0), 10, SHAPE), images)
  region = images[:, 29:, 29:, :]
  np.testing.assert_allclose(half[:, 29:, 29:, :],
                             region + 64 / 255 * (GRID[None, :, :, None] - region), atol=1e-3)


class TinyLinear(nn.Module):
  """A linear classifier on 4x4 average-pooled pixels (its penultimate layer: the pooled input)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.avg_pool(x, (8, 8), (8, 8)).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def numpy_pgd(weights, bias, images, labels, eps, step, steps):
  """Sign-gradient PGD on a linear softmax model over 8x8-pooled pixels / 255."""
  pool = lambda x: x.reshape(len(x), 4, 8, 4, 8, 3).mean((2, 4)).reshape(len(x), -1)
  x = images.copy()
  for _ in range(steps):
    logits = pool(x / 255) @ weights + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(x)), labels] -= 1  # d CE / d logits
    g_pooled = (p @ weights.T).reshape(len(x), 4, 1, 4, 1, 3) / 64 / 255
    grad = np.broadcast_to(g_pooled, (len(x), 4, 8, 4, 8, 3)).reshape(x.shape)
    x = np.clip(np.clip(x + step * np.sign(grad), images - eps, images + eps), 0, 255)
  return x


def test_cl_pgd_matches_numpy(images):
  model = TinyLinear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  labels = np.arange(len(images)) % 10
  out = label_consistent.pgd(model, variables, lambda x: x / 255.0, jnp.asarray(images),
                             jnp.asarray(labels), 8.0, 2.0, 10)
  params = variables['params']['Dense_0']
  expected = numpy_pgd(np.asarray(params['kernel'], np.float64),
                       np.asarray(params['bias'], np.float64), images.astype(np.float64), labels,
                       8.0, 2.0, 10)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-3)
  assert np.abs(np.asarray(out) - images).max() <= 8.0 + 1e-4


def test_cl_prepare_perturbs_only_the_poisoned_images(dataset, monkeypatch):
  seen = {}

  def surrogate(sur, num_classes, images, labels, key, fit):  # a cheap stand-in for the training
    seen.update(model=sur.model, epochs=sur.epochs, images=images, labels=labels)
    model = GlobalLinear()
    return model, model.init(key, jnp.zeros((1, *SHAPE)))

  monkeypatch.setattr(label_consistent, 'train_surrogate', surrogate)
  config = attack_config('cl', surrogate=dict(model='tiny', epochs=3, batch_size=100,
                                              learning_rate=0.05, lr_boundaries=(),
                                              crop_flip=False))
  attack = build_attack(config, 10, SHAPE, dataset)
  mask = poison_mask(dataset.train_labels, attack, 0.8, np.random.default_rng([0, 2]))
  out, labels, poisoned = prepare(attack, dataset.train_images, dataset.train_labels, mask,
                                    jax.random.key(0))
  assert out.dtype == np.uint8 and out.shape == dataset.train_images.shape
  np.testing.assert_array_equal(labels, dataset.train_labels)
  np.testing.assert_array_equal(poisoned, mask)
  diff = np.abs(out.astype(int) - dataset.train_images.astype(int))
  np.testing.assert_array_equal(diff[~mask], 0)
  assert diff.max() <= 8 and np.mean(diff[mask] > 0) > 0.5
  # The surrogate learns from every training image with its true label.
  assert seen['model'] == 'tiny' and seen['epochs'] == 3
  np.testing.assert_array_equal(seen['images'], dataset.train_images)
  np.testing.assert_array_equal(seen['labels'], dataset.train_labels)


def test_a_surrogate_reports_each_epoch_and_trains_the_same(dataset, capsys):
  """A surrogate trains for minutes before any stage prints: one line an epoch says so,
  and reporting changes nothing it trains."""
  from nad_jax import models, stages, train  # pylint: disable=g-import-not-at-top
  cfg = label_consistent.surrogate_config(
      attack_config('cl', surrogate=dict(model='tiny', epochs=2, batch_size=100,
                                         learning_rate=0.05, lr_boundaries=(),
                                         crop_flip=False)), len(dataset.train_images))
  model = models.build_model('tiny', 10)
  args = (model, cfg, dataset.train_images, dataset.train_labels, jax.random.key(0))
  logged = stages.fit_logged(*args)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('[surrogate]')]
  assert [l.split('  ')[0] for l in lines] == ['[surrogate] epoch 1/2', '[surrogate] epoch 2/2']
  jax.tree.map(np.testing.assert_array_equal, logged, train.fit(*args))


# -------------------------------------------------------------------------------- Refool

def cv2_resize_linear(image, out_h, out_w):
  """cv2.resize INTER_LINEAR (half-pixel centres, edge-clamped), float."""
  def coords(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    x0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    x1 = np.minimum(x0 + 1, n_in - 1)
    return x0, x1, src - x0
  y0, y1, wy = coords(image.shape[0], out_h)
  x0, x1, wx = coords(image.shape[1], out_w)
  rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def cv2_gaussian_blur(image, sigma):
  size = int(2 * np.ceil(2 * sigma) + 1)
  radius = size // 2
  k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  h, w = image.shape[:2]
  rows = sum(k[i] * padded[i:i + h] for i in range(size))
  return sum(k[i] * rows[:, i:i + w] for i in range(size))


def gen_kernel(kern_len=560, nsig=3):
  interval = (2 * nsig + 1.0) / kern_len
  x = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, kern_len + 1)
  cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
  kern1d = np.diff(cdf)
  raw = np.sqrt(np.outer(kern1d, kern1d))
  kernel = raw / raw.sum()
  return kernel / kernel.max()


def numpy_refool(images, bank, p):
  out = []
  kernel = gen_kernel()
  h, w = images.shape[1:3]
  for n in range(len(images)):
    t = np.power(images[n] / 255.0, 2.2)
    r = np.power(bank[p['index'][n]] / 255.0, 2.2)
    alpha_t = p['alpha_t'][n]
    if p['ghost'][n]:
      oy, ox = p['offset'][n]
      a = p['ghost_alpha'][n]
      r1 = np.pad(r, ((0, oy), (0, ox), (0, 0)))
      r2 = np.pad(r, ((oy, 0), (ox, 0), (0, 0)))
      ghost = (r1 * a + r2 * (1 - a))[oy:-oy, ox:-ox]
      ghost = cv2_resize_linear(ghost, h, w)
      blended = ghost * (1 - alpha_t) + t * alpha_t
    else:
      blur = cv2_gaussian_blur(r, p['sigma'][n])
      total = blur + t
      for c in range(3):
        above = total[:, :, c] > 1
        mean = max(1.0, np.sum(total[:, :, c] * above) / (above.sum() + 1e-6))
        blur[:, :, c] = blur[:, :, c] - (mean - 1) * p['att'][n]
      blur = np.clip(blur, 0, 1)
      wy, wx = p['window'][n]
      g = kernel[wy:wy + h, wx:wx + w][:, :, None] * (1 - alpha_t / 2)
      blended = blur * g + t * alpha_t
    out.append(np.clip(np.power(blended, 1 / 2.2), 0, 1) * 255)
  return np.stack(out)


def test_refool_matches_numpy(dataset):
  attack = build_attack(attack_config('refool', reflections=10, ghost_rate=0.5, **HELDOUT), 10,
                        SHAPE, dataset)
  heldout = refool.heldout_indices(dataset.train_labels, 5, 10, 0)
  assert np.all(dataset.train_labels[heldout] != 5)
  x = dataset.train_images[:12].astype(np.float32)
  key = jax.random.key(7)
  out = trigger(attack, x, key)
  p = jax.device_get(refool.draw(key, 12, 10, 0.5, (0.05, 0.45), SHAPE))
  p = {k: np.asarray(v, np.float64) if v.dtype.kind == 'f' else np.asarray(v) for k, v in p.items()}
  assert 0 < p['ghost'].sum() < 12  # both models exercised
  expected = numpy_refool(x.astype(np.float64), dataset.train_images[heldout].astype(np.float64), p)
  np.testing.assert_allclose(out, expected, atol=0.05)


def test_refool_holds_out_its_reflections(dataset):
  attack = build_attack(attack_config('refool', reflections=10, **HELDOUT), 10, SHAPE, dataset)
  mask = poison_mask(dataset.train_labels, attack, 0.8, np.random.default_rng([0, 2]))
  heldout = refool.heldout_indices(dataset.train_labels, 5, 10, 0)
  images, labels, poisoned = prepare(attack, dataset.train_images, dataset.train_labels, mask,
                                    jax.random.key(0))
  keep = np.setdiff1d(np.arange(len(mask)), heldout)
  np.testing.assert_array_equal(images, dataset.train_images[keep])
  np.testing.assert_array_equal(labels, dataset.train_labels[keep])
  np.testing.assert_array_equal(poisoned, mask[keep])
  assert poisoned.sum() == mask.sum()


def test_refool_reflection_folder(dataset, tmp_path):
  from PIL import Image
  for i in range(3):
    Image.fromarray(dataset.test_images[i]).save(tmp_path / f'{i}.png')
  attack = build_attack(attack_config('refool', pattern_path=str(tmp_path), selection_rounds=0),
                        10, SHAPE)
  assert attack.prepare is None
  assert trigger(attack, dataset.train_images[:2].astype(np.float32)).shape == (2, *SHAPE)


def test_refool_natural_bank_is_seeded_and_uses_no_victim_data():
  photos = refool.natural_photos()
  assert len(photos) == len(refool.NATURAL_IMAGES)
  bank = refool.natural_crops(photos, 12, SHAPE, 0)
  assert bank.shape == (12, *SHAPE) and bank.dtype == np.float32
  assert bank.min() >= 0 and bank.max() <= 255 and np.all(bank == np.round(bank))
  assert len({b.tobytes() for b in bank}) == 12  # twelve different crops
  np.testing.assert_array_equal(bank, refool.natural_crops(photos, 12, SHAPE, 0))
  assert not np.array_equal(bank, refool.natural_crops(photos, 12, SHAPE, 1))
  grey = refool.natural_crops(photos, 3, (16, 24, 1), 0)
  assert grey.shape == (3, 16, 24, 1)
  # Without selection the attack needs no dataset and removes no training image.
  attack = build_attack(attack_config('refool', reflections=12, selection_rounds=0), 10, SHAPE)
  assert attack.prepare is None and attack.clean_label


def test_refool_natural_bank_without_scikit_image(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, 'skimage', None)  # import skimage raises ImportError
  with pytest.raises(ValueError, match=r"attack\.reflection_source .*pip install"):
    build_attack(attack_config('refool', selection_rounds=0), 10, SHAPE)


def test_refool_selection_keeps_candidates_above_the_median():
  value = np.random.default_rng(0).permutation(40).astype(float)  # each candidate's success
  rounds = []

  def score(chosen, round_):
    rounds.append(np.asarray(chosen))
    return value[chosen]
  final = refool.select(40, 8, 12, score, np.random.default_rng(1))
  assert len(rounds) == 12 and all(len(set(c)) == 8 for c in rounds)
  np.testing.assert_array_equal(final, rounds[-1])
  for before, after in zip(rounds, rounds[1:]):
    above = before[value[before] > np.median(value[before])]
    assert set(above) <= set(after)  # above the median: kept for the next round
  tried = np.unique(np.concatenate(rounds))
  assert len(tried) > 8  # the others made room for new candidates
  # The best candidate tried is kept to the end, and the final set beats the first.
  assert tried[np.argmax(value[tried])] in final
  assert value[final].mean() > value[rounds[0]].mean()


class Brightness(nn.Module):
  """Says class 5 when an image's mean (of pixels / 255) is above 0.3, else class 0."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    margin = 100.0 * (x.mean(axis=(1, 2, 3)) - 0.3)
    return jnp.zeros((x.shape[0], 10)).at[:, 5].set(margin)


def test_refool_success_scorer_counts_the_target_predictions():
  # Grey images (mean 60/255 < 0.3); a white reflection's ghost lifts every one of them
  # above 0.3, a black one adds nothing: white scores all V held-out images, black none.
  labels = np.repeat(np.arange(10, dtype=np.int32), 10)
  images = np.full((100, *SHAPE), 60, np.uint8)
  candidates = refool.to_linear(np.stack([np.full(SHAPE, v, np.float32)
                                          for v in (255, 0, 0, 255)]))
  holdout = np.flatnonzero(labels != 5)[::3]
  seen = []

  def train_model(x, y, key):
    seen.append((x, y))
    return {}
  blend = refool.make_blend(1.0, (0.05, 0.45), SHAPE)  # ghosts only
  score = refool.success_scorer(Brightness(), train_model, images, labels, holdout, candidates,
                                5, 0.5, blend, jax.random.key(0), batch=4)
  np.testing.assert_array_equal(score(np.array([3, 1, 0]), 0), [len(holdout), 0, len(holdout)])
  x, y = seen[0]
  train = np.setdiff1d(np.arange(100), holdout)
  np.testing.assert_array_equal(y, labels[train])
  changed = np.flatnonzero(np.any(x != images[train], axis=(1, 2, 3)))
  assert len(changed) == 5 and np.all(y[changed] == 5)  # half of the 10 target images


@pytest.mark.slow
def test_refool_selection_runs_when_built_and_is_kept(dataset, tmp_path):
  """The selection trains a model per round when the attack is built; with a workdir's memo
  a second build (a resumed or evaluation-only run) takes the kept choice and trains none."""
  from nad_jax import stages, train
  config = attack_config('refool', reflections=4, reflection_candidates=12, selection_rounds=2,
                         selection_holdout=40, poison_rate=0.8)
  config.surrogate.update(epochs=1, batch_size=64)
  trained = []
  fit = lambda *args: trained.append(1) or train.fit(*args)
  memo = lambda: stages.AttackMemo(str(tmp_path), config, 'digest')
  first = memo()
  attack = build_attack(config, 10, SHAPE, dataset, fit=fit, memo=first)
  first.save()
  assert attack.prepare is None and attack.clean_label and len(trained) == 2
  again = build_attack(config, 10, SHAPE, dataset, fit=fit, memo=memo())
  assert len(trained) == 2
  rounds = attack.info['selection_rounds']  # what results.json reports, kept with the choice
  assert [r['round'] for r in rounds] == [1, 2] and again.info == attack.info
  assert all(0 <= r['median_asr'] <= r['best_asr'] <= 100 for r in rounds)
  x = dataset.train_images[:3].astype(np.float32)
  assert trigger(attack, x).shape == (3, *SHAPE)
  np.testing.assert_array_equal(trigger(attack, x), trigger(again, x))


def test_an_attacks_choice_is_kept_for_the_same_config_and_data(tmp_path):
  from nad_jax import stages
  calls = []
  choose = lambda: calls.append(1) or {'chosen': [3, 1, 2], 'rounds': [{'round': 1}]}
  config = attack_config('refool')

  def memo(cfg, digest, contents=None, workdir=str(tmp_path)):
    # a run's: it writes its choices once the run's checks pass
    kept = stages.AttackMemo(workdir, cfg, digest, contents)
    return lambda name, compute: (kept(name, compute), kept.save())[0]
  first = memo(config, 'a')('refool_selected', choose)
  unsaved = stages.AttackMemo(str(tmp_path), attack_config('refool', seed=2), 'a')
  unsaved('refool_selected', choose)  # a run refused before it saves
  again = memo(config, 'a')('refool_selected', choose)
  assert len(calls) == 2 and first == again == choose()
  calls.pop()
  memo(config, 'b')('refool_selected', choose)  # other data: chosen again
  other = attack_config('refool', seed=1)
  memo(other, 'b')('refool_selected', choose)  # another attack config: chosen again
  assert len(calls) == 4
  for workdir in (str(tmp_path), None):  # a run's folder; the API's process
    files = lambda digest: {'attack.pattern_path': digest}
    memo(other, 'b', files('x'), workdir)('refool_selected', choose)
    memo(other, 'b', files('x'), workdir)('refool_selected', choose)  # kept
    memo(other, 'b', files('y'), workdir)('refool_selected', choose)  # other files there
  assert len(calls) == 8
  kept = memo(other, 'b', files('y'), None)('refool_selected', choose)
  kept['chosen'].append(7)  # the caller's copy
  assert memo(other, 'b', files('y'), None)('refool_selected', choose) == choose()


# --------------------------------------------------------------------------------- WaNet

def keys_weight(x, a=-0.75):
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  if x < 2:
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return 0.0


def torch_bicubic_align_corners(v, out):
  """F.interpolate(mode='bicubic', align_corners=True) of a (C, k, k) array, as loops."""
  c, k, _ = v.shape
  result = np.zeros((c, out, out))
  for i in range(out):
    for j in range(out):
      sy, sx = i * (k - 1) / (out - 1), j * (k - 1) / (out - 1)
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      for m in range(-1, 3):
        for n in range(-1, 3):
          weight = keys_weight(sy - (y0 + m)) * keys_weight(sx - (x0 + n))
          result[:, i, j] += weight * v[:, min(max(y0 + m, 0), k - 1), min(max(x0 + n, 0), k - 1)]
  return result


def torch_grid_sample(image, grid):
  """grid_sample(bilinear, zeros, align_corners=True) of one (H, W, C) image, as loops."""
  h, w, _ = image.shape
  out = np.zeros_like(image)
  for i in range(h):
    for j in range(w):
      x = (grid[i, j, 0] + 1) / 2 * (w - 1)
      y = (grid[i, j, 1] + 1) / 2 * (h - 1)
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
        for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
          if 0 <= yy < h and 0 <= xx < w:
            out[i, j] += wy * wx * image[yy, xx]
  return out


def numpy_wanet_grid(seed, k, s, size):
  control = streams.rng(seed, 'wanet_field').uniform(-1, 1, (2, k, k))
  control /= np.mean(np.abs(control))
  noise = torch_bicubic_align_corners(control, size).transpose(1, 2, 0)
  line = np.linspace(-1, 1, size)
  identity = np.stack([np.broadcast_to(line[None, :], (size, size)),
                       np.broadcast_to(line[:, None], (size, size))], -1)
  return np.clip(identity + s * noise / size, -1, 1)


def test_wanet_trigger_matches_numpy(images):
  attack = build_attack(attack_config('wanet', warp_k=4, warp_strength=0.5), 10, SHAPE)
  grid = numpy_wanet_grid(0, 4, 0.5, 32)
  np.testing.assert_allclose(wanet.warp_grid(0, 4, 0.5, SHAPE), grid, atol=1e-5)
  out = trigger(attack, images[:2])
  expected = np.stack([torch_grid_sample(im.astype(np.float64), grid) for im in images[:2]])
  np.testing.assert_allclose(out, expected, atol=2e-2)
  strong = trigger(build_attack(attack_config('wanet', warp_k=8, warp_strength=2.0, seed=3), 10,
                                SHAPE), images[:1])
  expected = torch_grid_sample(images[0].astype(np.float64), numpy_wanet_grid(3, 8, 2.0, 32))
  np.testing.assert_allclose(strong[0], expected, atol=2e-2)


def test_wanet_noise_mode(dataset):
  attack = build_attack(attack_config('wanet', cross_ratio=2.0), 10, SHAPE)
  mask = poison_mask(dataset.train_labels, attack, 0.1, np.random.default_rng([0, 2]))
  images, labels, poisoned = prepare(attack, dataset.train_images, dataset.train_labels, mask,
                                    jax.random.key(0))
  np.testing.assert_array_equal(labels, dataset.train_labels)
  np.testing.assert_array_equal(poisoned, mask)
  changed = np.flatnonzero(np.any(images != dataset.train_images, axis=(1, 2, 3)))
  chosen = np.sort(streams.rng(0, 'wanet_noise_mode').choice(
      np.flatnonzero(~mask), 2 * mask.sum(), replace=False))
  assert set(changed) <= set(chosen) and len(changed) >= len(chosen) - 1
  grid = numpy_wanet_grid(0, 4, 0.5, 32)
  key = jax.random.key(0)  # the key handed to prepare above
  for index in chosen[:2]:
    jitter = np.asarray(wanet.noise_jitter(key, index, (32, 32, 2)), np.float64)
    expected = torch_grid_sample(dataset.train_images[index].astype(np.float64),
                                 np.clip(grid + jitter / 32, -1, 1))
    assert np.abs(images[index] - np.clip(np.round(expected), 0, 255)).max() <= 1
  none = build_attack(attack_config('wanet', cross_ratio=0.0), 10, SHAPE)
  assert none.prepare is None


# ------------------------------------------------------------------- config & validation

@pytest.mark.parametrize('module', [nad_cifar, quickstart])
def test_config_variants(module):
  for variant in defaults.ATTACK_VARIANTS:
    config = module.get_config(variant)
    expected = 'badnets' if variant == 'all2all' else variant
    assert config.attack.name == expected
  assert module.get_config('all2all').attack.mode == 'all_to_all'
  with pytest.raises(ValueError, match='no variant'):
    module.get_config('nope')


# What the attacks check themselves: a field against the images, the dataset or a file.
# Each field's own range, choices and type are rules of validation.RULES, tested in
# tests/test_validation.py.
@pytest.mark.parametrize('name, overrides, field', [
    ('nope', {}, 'attack.name'),
    ('badnets', {'size': 40, 'pattern': 'square'}, 'attack.size'),
    ('badnets', {'size': 5, 'pattern': 'grid'}, 'attack.size'),
    ('cl', {'size': 40, 'pattern': 'square'}, 'attack.size'),
    ('cl', {'surrogate': {'batch_size': 1024}}, 'attack.surrogate.batch_size'),
    ('trojan', {'size': 29, 'pattern_path': ''}, 'attack.size'),
    ('blend', {'pattern_path': '/no/such/file.png'}, 'attack.pattern_path'),
    ('trojan', {'pattern_path': '/no/such/file.npz'}, 'attack.pattern_path'),
    ('sig', {'mode': 'all_to_all'}, 'attack.clean_label'),
    ('refool', {'reflections': 10_000, **HELDOUT}, 'attack.reflections'),
    ('refool', {'reflection_candidates': 10_000, 'reflection_source': 'heldout'},
     'attack.reflection_candidates'),
    ('refool', {'reflections': 300, 'reflection_candidates': 100}, 'attack.reflections'),
    ('refool', {'selection_holdout': 10_000, 'reflection_candidates': 10, 'reflections': 5},
     'attack.selection_holdout'),
    ('refool', {'pattern_path': __file__}, 'attack.pattern_path'),
    ('wanet', {'warp_k': 40}, 'attack.warp_k'),
])
def test_bad_values_name_the_field(name, overrides, field, dataset):
  config = attack_config('badnets')
  config.name = name
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    build_attack(config, 10, SHAPE, dataset)


def test_pattern_file_of_the_wrong_size(tmp_path):
  np.save(tmp_path / 'small.npy', np.zeros((16, 16), np.uint8))
  with pytest.raises(ValueError, match='attack.pattern_path'):
    build_attack(attack_config('sig', pattern_path=str(tmp_path / 'small.npy')), 10, SHAPE)


def test_pattern_file_out_of_range(tmp_path):
  np.save(tmp_path / 'bright.npy', np.full((32, 32), 300.0, np.float32))
  with pytest.raises(ValueError, match=r'attack\.pattern_path .*\[0, 255\]'):
    build_attack(attack_config('blend', pattern_path=str(tmp_path / 'bright.npy')), 10, SHAPE)


def test_refool_needs_a_dataset_for_heldout_reflections_or_the_selection():
  for overrides in (HELDOUT, {'reflection_candidates': 10}):
    with pytest.raises(ValueError, match='dataset'):
      build_attack(attack_config('refool', **overrides), 10, SHAPE)
