"""train.make_test_set / make_evaluate: acc, acc_nontarget, asr and ra against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nad_jax import defaults, models, train
from nad_jax.attacks import build_attack

SHAPE = (32, 32, 3)
BATCH = 8  # divisible by the 4 forced CPU devices


def attack_config(name='badnets', **overrides):
  config = defaults.paper_config().attack
  config.name = name
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def setup():
  """A random tiny net and random test images (43: not a whole number of batches)."""
  model = models.build_model('tiny', 10)
  variables = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (43, *SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 10, 43).astype(np.int32)
  return model, variables, images, labels


def predictions(model, variables, images):
  x = train.normalizer(None, None)(jnp.asarray(images, jnp.float32))
  return np.asarray(jnp.argmax(model.apply(variables, x, train=False), -1))


def reference(model, variables, images, labels, attack, key):
  """The definition the evaluation had before it skipped the target class: trigger everything."""
  clean = predictions(model, variables, images)
  triggered = predictions(model, variables, attack.trigger(jnp.asarray(images, jnp.float32), key))
  targets = np.asarray(attack.relabel(labels))
  nontarget = targets != labels
  return {'acc': 100 * np.mean(clean == labels),
          'acc_nontarget': 100 * np.mean(clean[nontarget] == labels[nontarget]),
          'asr': 100 * np.mean(triggered[nontarget] == targets[nontarget]),
          'ra': 100 * np.mean(triggered[nontarget] == labels[nontarget])}


@pytest.mark.parametrize('mode', ['all_to_one', 'all_to_all'])
@pytest.mark.parametrize('scan', [True, False])
def test_metrics_match_the_definition_for_a_deterministic_trigger(setup, mode, scan):
  model, variables, images, labels = setup
  attack = build_attack(attack_config(mode=mode), 10, SHAPE)
  mesh = train.make_mesh()
  test_set = train.make_test_set(images, labels, BATCH, mesh, attack)
  evaluate = train.make_evaluate(model, mesh, train.normalizer(None, None), attack, scan)
  metrics = jax.device_get(evaluate(variables, test_set, jax.random.key(1)))
  expected = reference(model, variables, images, labels, attack, jax.random.key(1))
  assert set(metrics) == {'acc', 'acc_nontarget', 'asr', 'ra'}
  for name, value in expected.items():
    assert float(metrics[name]) == pytest.approx(value, abs=1e-4), name


def test_only_the_images_the_metrics_count_are_triggered(setup):
  """All-to-one: the backdoor batches hold the non-target images only; all-to-all: every image."""
  _, _, images, labels = setup
  mesh = train.make_mesh()
  for mode, count in (('all_to_one', int(np.sum(labels != 5))), ('all_to_all', len(labels))):
    test_set = jax.device_get(train.make_test_set(
        images, labels, BATCH, mesh, build_attack(attack_config(mode=mode), 10, SHAPE)))
    valid = test_set.backdoor_valid
    assert valid.sum() == count and test_set.backdoor_labels.shape[0] == -(-count // BATCH)
    kept = labels != 5 if mode == 'all_to_one' else np.ones(len(labels), bool)
    np.testing.assert_array_equal(test_set.backdoor_images[valid], images[kept])
    np.testing.assert_array_equal(test_set.true_labels[valid], labels[kept])
    expected = 5 if mode == 'all_to_one' else (labels[kept] + 1) % 10
    np.testing.assert_array_equal(test_set.backdoor_labels[valid], expected)
    assert test_set.valid.sum() == len(labels)


@pytest.mark.parametrize('scan', [True, False])
def test_a_set_smaller_than_a_batch_is_not_padded_to_one(setup, scan):
  """43 images with an evaluation batch of 1000: one batch of 44 (a multiple of the 4
  devices), not 1000 of which 957 are zeros; the metrics are those of small batches."""
  model, variables, images, labels = setup
  mesh = train.make_mesh()
  attack = build_attack(attack_config(), 10, SHAPE)
  test_set = jax.device_get(train.make_test_set(images, labels, 1000, mesh, attack))
  count = int(np.sum(labels != 5))
  assert test_set.images.shape[:2] == (1, 44) and test_set.valid.sum() == 43
  assert test_set.backdoor_images.shape[:2] == (1, -(-count // 4) * 4)
  evaluate = train.make_evaluate(model, mesh, train.normalizer(None, None), attack, scan)
  large, small = (jax.device_get(evaluate(variables, train.make_test_set(
      images, labels, batch, mesh, attack), jax.random.key(1))) for batch in (1000, BATCH))
  for name in small:
    assert float(large[name]) == pytest.approx(float(small[name]), abs=1e-4), name


def test_given_poisoned_images_are_used_as_they_are(setup, tmp_path):
  """The 'files' attack: asr and ra on the .npz's images, no trigger applied; acc on the clean set."""
  model, variables, images, labels = setup
  rng = np.random.default_rng(5)
  poisoned = rng.integers(0, 256, (13, *SHAPE), dtype=np.uint8)
  original = rng.integers(0, 10, 13).astype(np.int32)
  original[original == 5] = 4
  original[0] = 5  # backdoor label == true label: dropped
  backdoor = np.full(13, 5, np.int32)
  np.savez(tmp_path / 'bd.npz', images=poisoned, labels=backdoor, original_labels=original)
  attack = build_attack(attack_config('files', path=str(tmp_path / 'bd.npz')), 10, SHAPE)
  assert attack.trigger is None and len(attack.test_set.images) == 12
  mesh = train.make_mesh()
  for scan in (True, False):
    evaluate = train.make_evaluate(model, mesh, train.normalizer(None, None), attack, scan)
    metrics = jax.device_get(evaluate(
        variables, train.make_test_set(images, labels, BATCH, mesh, attack), jax.random.key(0)))
    predicted = predictions(model, variables, poisoned[1:])
    clean = predictions(model, variables, images)
    assert float(metrics['asr']) == pytest.approx(100 * np.mean(predicted == 5), abs=1e-4)
    assert float(metrics['ra']) == pytest.approx(100 * np.mean(predicted == original[1:]),
                                                 abs=1e-4)
    assert float(metrics['acc']) == pytest.approx(100 * np.mean(clean == labels), abs=1e-4)
    nontarget = labels != 5
    assert float(metrics['acc_nontarget']) == pytest.approx(
        100 * np.mean(clean[nontarget] == labels[nontarget]), abs=1e-4)


def test_files_attack_reads_a_folder_by_label(setup, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, _, images, _ = setup
  for i, label in enumerate((0, 3, 10, 3)):
    (tmp_path / str(label)).mkdir(exist_ok=True)
    Image.fromarray(images[i]).save(tmp_path / str(label) / f'{i}.png')
  (tmp_path / '3' / '.hidden.png').write_bytes(b'')
  (tmp_path / '3' / 'notes.txt').write_text('not an image')
  attack = build_attack(attack_config('files', path=str(tmp_path), mode='all_to_all'), 11, SHAPE)
  test = attack.test_set
  np.testing.assert_array_equal(test.original_labels, [0, 3, 3, 10])
  np.testing.assert_array_equal(test.labels, [1, 4, 4, 0])
  np.testing.assert_array_equal(test.images, images[[0, 1, 3, 2]])


@pytest.mark.parametrize('content, fragment', [
    ('missing', 'attack.path .* does not exist'),
    ('no_labels', r"lacks arrays \['original_labels'\]"),
    ('wrong_size', r'images are uint8 \(2, 16, 16, 3\); expected uint8 \(N, 32, 32, 3\)'),
    ('wrong_target', r"disagree with attack.mode 'all_to_one' / attack.target_label 5"),
    ('only_target', 'holds no image whose backdoor label differs'),
    ('junk', 'cannot be read as .npz'),
])
def test_files_attack_errors_name_the_field(content, fragment, tmp_path):
  path = tmp_path / 'bd.npz'
  x = np.zeros((2, *SHAPE), np.uint8)
  if content == 'no_labels':
    np.savez(path, images=x, labels=np.array([5, 5]))
  elif content == 'wrong_size':
    np.savez(path, images=np.zeros((2, 16, 16, 3), np.uint8), labels=np.array([5, 5]),
             original_labels=np.array([1, 2]))
  elif content == 'wrong_target':
    np.savez(path, images=x, labels=np.array([5, 3]), original_labels=np.array([1, 2]))
  elif content == 'only_target':
    np.savez(path, images=x, labels=np.array([5, 5]), original_labels=np.array([5, 5]))
  elif content == 'junk':
    path.write_bytes(b'not a zip')
  with pytest.raises(ValueError, match=fragment) as error:
    build_attack(attack_config('files', path=str(path)), 10, SHAPE)
  assert '\n' not in str(error.value)
