"""Data sources: tfds (offline, on tfds's mock data), image folders, the synthetic set."""

import numpy as np
import pytest
from PIL import Image

from nad_jax import data


def test_tfds_source_reads_train_and_test_as_uint8():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    ds = data.tfds_source('cifar10', None)
  assert ds.num_classes == 10
  assert ds.train_images.shape == (24, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (24, 32, 32, 3)
  assert ds.train_labels.dtype == np.int32 and ds.train_labels.max() < 10


def test_folder_source_reads_classes_in_sorted_order(tmp_path):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in ('cat', 'ant'):
      (tmp_path / split / name).mkdir(parents=True)
      for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / split / name / f'{i}.png')
  ds = data.folder(str(tmp_path))
  assert ds.num_classes == 2
  assert list(ds.train_labels) == [0, 0, 0, 1, 1, 1]  # 'ant' before 'cat'
  first = np.asarray(Image.open(tmp_path / 'train' / 'ant' / '0.png'))
  np.testing.assert_array_equal(ds.train_images[0], first)


def test_folder_source_names_a_missing_split(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  with pytest.raises(data.DataError, match="'test'"):
    data.folder(str(tmp_path))


def test_synthetic_is_balanced_and_not_trivial():
  ds = data.synthetic(0, 2000, 500)
  assert np.bincount(ds.train_labels, minlength=10).min() > 150
  assert ds.train_images.dtype == np.uint8 and 40 < ds.train_images.std() < 80


def within_class_similarity(ds) -> float:
  """Mean cosine similarity of same-class images' low-frequency amplitude spectra (which a
  circular shift of the texture leaves unchanged)."""
  x = ds.train_images.astype(float)
  spectra = np.abs(np.fft.fft2(x - x.mean((1, 2), keepdims=True), axes=(1, 2)))[:, :5, :5]
  spectra = spectra.reshape(len(x), -1)
  spectra -= spectra.mean(0)
  spectra /= np.linalg.norm(spectra, axis=1, keepdims=True)
  means = []
  for c in range(ds.num_classes):
    same = spectra[ds.train_labels == c]
    gram = same @ same.T
    means.append((gram.sum() - np.trace(gram)) / (len(same) ** 2 - len(same)))
  return float(np.mean(means))


def test_synthetic_textures_per_class_varies_a_class():
  one, three = (data.synthetic(0, 2000, 10, textures_per_class=k) for k in (1, 3))
  assert np.bincount(three.train_labels, minlength=10).min() > 150
  assert within_class_similarity(three) < 0.5 * within_class_similarity(one)
  with pytest.raises(data.DataError, match='data.textures_per_class'):
    data.synthetic(0, 10, 10, textures_per_class=0)
