"""SIG (Barni, Kallas & Tondi, 2019, "A new backdoor attack in CNNs by training set
corruption without label poisoning", ICIP, arXiv:1902.11237): a clean-label attack.

Only training images of the target class are poisoned and keep their labels; the
trigger is a horizontal sinusoid, equal in every row and channel,

    v(j) = delta * sin(2 * pi * j * frequency / width),     j = column index,

added to the image and clipped to [0, 255] (Barni et al.: delta 20, f 6 on CIFAR-10).

config.attack fields:
  delta, frequency  the generated signal (defaults 20 and 6).
  pattern_path      '' (default): the generated signal. Otherwise a signal file
                    (.npy/.npz, HW or HWC), e.g. the NAD authors' released
                    `signal_cifar10_mask.npy`: int8 values stored as uint8 (negative
                    values wrapped, -15 as 241); they are read back as signed values
                    (a sinusoid of amplitude 19 and period ~8 pixels).
  sig_mode          'add' (default, Barni et al.): clip(image + v, 0, 255).
                    'blend': (1 - alpha) * image + alpha * v, clipped (the formula of
                    the NAD code, with the signal's signed values).
                    'blend_raw': the NAD code's exact arithmetic on the released
                    mask, which it reads as uint8, so its negative lobes act as
                    237..255: (1 - alpha) * image + alpha * (v mod 256). With no
                    pattern_path the generated signal is stored as that file
                    stores it (truncated to integers) first.
  alpha             blend ratio for 'blend' / 'blend_raw' (the NAD code: 0.2).
  clean_label       None/True (default): clean-label; False: dirty-label variant.

The released mask is exactly trunc(20 sin(0.8 j)) in every row, i.e. delta 20 and
frequency NAD_CODE_FREQUENCY (0.8 rad per pixel on a 32-pixel width): sig_mode
'blend_raw' with that frequency is the NAD code's SIG without the file.
"""

import jax.numpy as jnp
import numpy as np

from nad_jax.attacks.core import Attack, field, load_pattern

MODES = ('add', 'blend', 'blend_raw')
NAD_CODE_FREQUENCY = 0.8 * 32 / (2 * np.pi)  # cycles per width of the released mask


def signal(delta: float, frequency: float, image_shape: tuple[int, int, int]) -> np.ndarray:
  """The sinusoid v(j), as an (H, W, 1) float32 pattern.

  Args:
    delta: the amplitude in pixel units (Barni et al.: 20).
    frequency: cycles per image width (Barni et al.: 6).
    image_shape: (H, W, C) of the images.

  Returns:
    (H, W, 1) float32 in [-delta, delta], equal in every row.
  """
  height, width, _ = image_shape
  row = delta * np.sin(2 * np.pi * np.arange(width) * frequency / width)
  return np.broadcast_to(row[None, :, None], (height, width, 1)).astype(np.float32)


def signed(mask: np.ndarray) -> np.ndarray:
  """Signal values from a file: uint8 with wrapped negatives -> signed float32.

  Args:
    mask: a loaded pattern; uint8 is reinterpreted as int8 (241 -> -15), any other
      dtype is taken as is.

  Returns:
    The values as float32, same shape.
  """
  if mask.dtype == np.uint8:
    return mask.view(np.int8).astype(np.float32)
  return mask.astype(np.float32)


def build(cfg, num_classes: int, image_shape: tuple[int, int, int], dataset=None) -> Attack:
  """Builds SIG (Barni et al., ICIP 2019) from `config.attack` (fields in the module docstring).

  Args:
    cfg: `config.attack`; sig_mode ('add'), alpha (0.2), pattern_path (''),
      delta (20), frequency (6).
    num_classes: unused.
    image_shape: (H, W, C) of the images.
    dataset: unused.

  Returns:
    A clean-label Attack; its trigger maps (N, H, W, C) float32 in [0, 255] to
    the same, clipped to [0, 255], and ignores the PRNG key.

  Raises:
    ValueError: a pattern file that cannot be read or does not fit the images
      (sig_mode, alpha, delta and frequency are rules of `validation.RULES`).
  """
  del num_classes, dataset
  mode = field(cfg, 'sig_mode')
  alpha = float(field(cfg, 'alpha'))
  path = field(cfg, 'pattern_path')
  if path:
    raw = load_pattern(path, image_shape)
    pattern = signed(raw)
    if mode == 'blend_raw':
      pattern = np.mod(pattern, 256.0)
  else:
    delta, frequency = float(field(cfg, 'delta')), float(field(cfg, 'frequency'))
    pattern = signal(delta, frequency, image_shape)
    if mode == 'blend_raw':
      pattern = np.mod(np.trunc(pattern), 256.0)
  pattern = jnp.asarray(pattern, jnp.float32)

  def trigger(images, key):
    del key  # one fixed signal
    if mode == 'add':
      out = images + pattern
    else:
      out = (1.0 - alpha) * images + alpha * pattern
    return jnp.clip(out, 0.0, 255.0)
  return Attack('sig', trigger, relabel=None, clean_label=True)
