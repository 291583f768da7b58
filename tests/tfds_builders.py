"""Two tiny tfds builders for tests/test_tfds.py; nothing is downloaded.

They live in a module of the `tests` package, as a user's or tfds's own builders live in
a package: tfds then resolves their code path through importlib resources, the path on
which a real `download_and_prepare` runs.
"""

import numpy as np
import tensorflow_datasets as tfds

TRAIN, TEST = 256, 64


class NadTestImages(tfds.core.GeneratorBasedBuilder):
  """32x32 RGB images of 10 classes, made from a seed: no download."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(32, 32, 3)),
            'label': tfds.features.ClassLabel(num_classes=10)}),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, TRAIN), 'test': self._generate_examples(1, TEST)}

  def _generate_examples(self, seed, count):
    rng = np.random.default_rng(seed)
    for i in range(count):
      yield i, {'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 'label': i % 10}


class NadTestUnreachable(NadTestImages):
  """The same images behind a download that fails, as it does without network."""

  def _split_generators(self, dl_manager):
    raise ConnectionError('Max retries exceeded with url: /cifar-10.tar.gz\nsecond line')
