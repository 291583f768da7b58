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


def image_tree(root, classes=('ant', 'cat'), count=2, size=(8, 8)):
  """Writes tiny PNGs to root/{train,test}/<class>/<i>.png; returns root as a str."""
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in classes:
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / split / name / f'{i}.png')
  return str(root)


def test_folder_skips_hidden_entries_and_keeps_labels(tmp_path, capsys):
  path = image_tree(tmp_path)
  for split in ('train', 'test'):  # as Jupyter leaves them: a hidden folder beside the classes
    (tmp_path / split / '.ipynb_checkpoints').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'cat' / '.hidden.png')
  ds = data.folder(path)
  assert ds.num_classes == 2
  assert list(ds.train_labels) == [0, 0, 1, 1] and list(ds.test_labels) == [0, 0, 1, 1]
  assert 'skipped 3 entries' in capsys.readouterr().out
  assert data.scan_folder(path).skipped == [
      'test/.ipynb_checkpoints', 'train/.ipynb_checkpoints', 'train/cat/.hidden.png']


def test_folder_skips_and_reports_non_image_files(tmp_path, capsys):
  path = image_tree(tmp_path)
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'cat' / 'UPPER.PNG')
  ds = data.folder(path)
  assert list(ds.train_labels) == [0, 0, 1, 1, 1]  # the .PNG counts: extensions ignore case
  out = capsys.readouterr().out
  assert out.startswith(f'data.path {path!r}: skipped 1 entries')
  assert 'train/cat/notes.txt' in out


def test_folder_prints_nothing_when_nothing_is_skipped(tmp_path, capsys):
  data.folder(image_tree(tmp_path))
  assert capsys.readouterr().out == ''


def test_folder_names_an_image_pillow_cannot_read(tmp_path):
  path = image_tree(tmp_path)
  (tmp_path / 'test' / 'ant' / 'random.png').write_bytes(np.random.default_rng(0).bytes(64))
  with pytest.raises(data.DataError, match=r'^data\.path .*test/ant/random\.png'):
    data.folder(path)
  (tmp_path / 'test' / 'ant' / 'random.png').unlink()
  good = (tmp_path / 'train' / 'cat' / '0.png').read_bytes()
  (tmp_path / 'train' / 'cat' / 'cut.png').write_bytes(good[:len(good) // 2])
  with pytest.raises(data.DataError, match=r'^data\.path .*cut\.png'):
    data.folder(path)


def test_folder_names_an_empty_class_folder(tmp_path):
  path = image_tree(tmp_path)
  (tmp_path / 'train' / 'dog').mkdir()
  (tmp_path / 'test' / 'dog').mkdir()
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('no image here')
  with pytest.raises(data.DataError, match=r'^data\.path .*train/dog holds no image'):
    data.folder(path)


def test_folder_names_a_class_missing_from_test(tmp_path):
  path = image_tree(tmp_path)
  (tmp_path / 'train' / 'dog').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'dog' / '0.png')
  with pytest.raises(data.DataError,
                     match=r"^data\.path .*in train but not in test: \['dog'\]; "
                           r'in test but not in train: \[\]'):
    data.folder(path)


def test_folder_names_an_extra_class_in_test(tmp_path):
  path = image_tree(tmp_path)
  (tmp_path / 'test' / 'dog').mkdir()
  with pytest.raises(data.DataError,
                     match=r"^data\.path .*in train but not in test: \[\]; "
                           r"in test but not in train: \['dog'\]"):
    data.folder(path)


def test_folder_names_the_first_image_of_another_size(tmp_path):
  path = image_tree(tmp_path)
  Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / 'train' / 'cat' / 'wide.png')
  with pytest.raises(data.DataError,
                     match=r'^data\.path .*cat/wide\.png is 8x6 but .*ant/0\.png is 8x8'):
    data.folder(path)


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
