"""Attack registry: `config.attack` to an `Attack` of on-device pure functions.

Every attack module has `build(cfg, num_classes, image_shape, dataset) -> Attack`
and documents its parameters (fields of `config.attack`) and source paper.
Fields every attack shares: name, target_label, poison_rate, mode
('all_to_one' | 'all_to_all'), clean_label (None: the attack's default;
True/False overrides it). `seed` seeds the attack's own random choices where it
makes any (Blend's noise pattern, Trojan's patch, WaNet's warping field, Refool's
reflections); the other attacks do not read it.
"""

from nad_jax.attacks import badnets
from nad_jax.attacks import blend
from nad_jax.attacks import files
from nad_jax.attacks import label_consistent
from nad_jax.attacks import refool
from nad_jax.attacks import sig
from nad_jax.attacks import trojan
from nad_jax.attacks import wanet
from nad_jax.attacks.core import DEFAULTS, Attack, PoisonedTest, poison_mask, prepare, relabel_fn

__all__ = ['Attack', 'ATTACKS', 'DEFAULTS', 'PoisonedTest', 'build_attack', 'poison_mask',
           'prepare', 'relabel_fn']


# Attacks that train a model with the `fit` handed to build_attack (CL in `prepare`).
TRAIN_A_MODEL = ('cl', 'refool')
# Attacks whose build makes a costly choice, kept by the `memo` handed to build_attack.
REMEMBER = ('refool',)
# Attacks whose trigger draws per image from its key: the test images' triggers, and so ASR,
# depend on the seed (streams 'evaluation').
DRAWS_PER_IMAGE = ('refool',)

ATTACKS = {
    'badnets': badnets.build,
    'trojan': trojan.build,
    'blend': blend.build,
    'sig': sig.build,
    'cl': label_consistent.build,
    'refool': refool.build,
    'wanet': wanet.build,
    'files': files.build,  # poisoned test images from files; no trigger, no training
}


def build_attack(cfg, num_classes: int, image_shape: tuple[int, int, int],
                 dataset=None, fit=None, memo=None) -> Attack:
  """Builds the attack named by `cfg.name`; ValueError names the bad field.

  `dataset` (a `data.Dataset`) is needed only by attacks that draw material from
  the training set (Refool's held-out reflection images and its selection).

  Args:
    cfg: `config.attack` (a ConfigDict): name (a key of ATTACKS), target_label,
      mode, clean_label, plus the fields the named attack's module documents.
    num_classes: the number of classes.
    image_shape: (H, W, C) of the images.
    dataset: a `data.Dataset`, or None where the attack needs none.
    fit: the engine's trainer (`nad_jax.train.fit`), for attacks that train a model
      (TRAIN_A_MODEL: CL's surrogate, Refool's selection); the attacks do not import
      the engine.
    memo: `memo(name, compute)`, which returns what `compute()` (JSON-serialisable) returned
      for the same attack config and data before (`stages.AttackMemo` keeps it in the
      workdir), for attacks whose build makes a costly choice (REMEMBER: Refool's
      selected reflections); None: computed at every build.

  Returns:
    The Attack, its `relabel` set from `cfg.mode` / `cfg.target_label` and its
    `clean_label` from `cfg.clean_label` (None: the attack's default).

  Raises:
    ValueError: an unknown name, clean_label with mode 'all_to_all', or a field of
      the attack that does not fit the images, the dataset or a file (the message
      names the `attack.` field). Each field's own range, choices and type are
      checked before, by `validation.validate` (`validation.RULES`).
  """
  if cfg.name not in ATTACKS:
    raise ValueError(f'unknown attack.name {cfg.name!r}; choose one of {sorted(ATTACKS)}')
  # Attacks that train a model get the engine's trainer handed in (they sit below it).
  extra = {'fit': fit} if cfg.name in TRAIN_A_MODEL else {}
  if cfg.name in REMEMBER:
    extra['memo'] = memo
  attack = ATTACKS[cfg.name](cfg, num_classes, tuple(image_shape), dataset, **extra)
  relabel = relabel_fn(cfg.get('mode', 'all_to_one'), cfg.target_label, num_classes)
  clean_label = cfg.get('clean_label')
  clean_label = attack.clean_label if clean_label is None else bool(clean_label)
  if clean_label and cfg.get('mode', 'all_to_one') != 'all_to_one':
    raise ValueError(f'attack.clean_label: the {cfg.name} attack poisons target-class samples '
                     "only, which needs attack.mode 'all_to_one'")
  return attack._replace(relabel=relabel, clean_label=clean_label)
