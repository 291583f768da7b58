"""Building blocks shared by the configs."""

import ml_collections


def sgd_stage(epochs: int, batch_size: int, learning_rate: float, lr_boundaries=(),
              lr_decay: float = 0.1, crop_flip: bool = True, cutout: int = 0,
              eval_every: int = 1, **extra) -> ml_collections.ConfigDict:
  """One training stage: SGD (Nesterov momentum 0.9, weight decay 1e-4), step decay by epoch.

  The stage evaluates (acc, acc_nontarget, asr) and checkpoints every `eval_every`
  epochs and after the last (the paper: every epoch).
  """
  return ml_collections.ConfigDict(dict(
      epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
      lr_boundaries=tuple(lr_boundaries), lr_decay=lr_decay, momentum=0.9, nesterov=True,
      weight_decay=1e-4, crop_flip=crop_flip, cutout=cutout, eval_every=eval_every, **extra))


def paper_config() -> ml_collections.ConfigDict:
  """The paper's setting: CIFAR-10 (tfds), WRN-16-1, BadNets grid -> label 5 on 10%, NAD."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.eval_only = False
  config.runner = 'nad'  # 'nad': pipeline.run; 'table1': the defense comparison (configs/table1.py)
  config.distributed = False  # True: jax.distributed.initialize() (multi-host TPU/GPU)
  # JAX's persistent compilation cache: a rerun or a resumed run loads its compiled steps
  # instead of compiling them again. '' turns it off.
  config.compilation_cache = '~/.cache/nad_jax/xla'
  # One dispatch per epoch (lax.scan over steps): None picks it on GPU/TPU, not on CPU.
  config.scan_epoch = ml_collections.config_dict.placeholder(bool)

  config.model = ml_collections.ConfigDict(dict(
      name='wrn16_1', dtype='float32',
      # 'onednn': oneDNN's convolutions on one CPU device (pip install -e '.[onednn]').
      conv='xla',
      # Input scaling: pixels / 255, then (x - mean) / std when both are set.
      mean=ml_collections.config_dict.placeholder(tuple),
      std=ml_collections.config_dict.placeholder(tuple)))

  config.data = ml_collections.ConfigDict(dict(
      source='tfds', name='cifar10', data_dir=ml_collections.config_dict.placeholder(str),
      path='', train_size=50_000, test_size=10_000, num_classes=10,
      clean_fraction=0.05, eval_batch_size=1000,
      textures_per_class=1))  # synthetic: how many textures a class draws its images from

  # nad_jax/attacks/<name>.py documents each attack's fields and source paper.
  config.attack = ml_collections.ConfigDict(dict(
      name='badnets', target_label=5, poison_rate=0.1, mode='all_to_one',
      pattern='grid', size=3, corner='bottom_right',
      seed=0,  # the attack's own draws: noise pattern, warp field, reflection images
      clean_label=ml_collections.config_dict.placeholder(bool),  # None: the attack's default
      pattern_path='',  # trojan/blend/sig: a trigger file; refool: a folder of reflections
      alpha=0.2,  # blend; sig with sig_mode 'blend'
      delta=20.0, frequency=6.0, sig_mode='add',  # sig
      amplitude=255.0, pgd_eps=8.0, pgd_step=2.0, pgd_steps=10,  # cl (pixel units)
      # cl: the clean model PGD attacks; trojan: the random model a patch is generated for.
      surrogate=ml_collections.ConfigDict(dict(
          model='tiny', epochs=10, batch_size=128, learning_rate=0.05, lr_boundaries=(),
          crop_flip=True)),
      trojan_neurons=1, trojan_steps=200,  # trojan without pattern_path
      reflections=200, ghost_rate=0.69, reflection_strength=(0.05, 0.45),  # refool
      warp_k=4, warp_strength=0.5, cross_ratio=2.0))  # wanet

  # The official backdoor training: SGD lr 0.1 without augmentation.
  config.backdoor_training = sgd_stage(100, 128, 0.1, lr_boundaries=(50, 75), crop_flip=False)
  config.student = ml_collections.ConfigDict(dict(
      checkpoint=ml_collections.config_dict.placeholder(str)))
  # Teacher: the backdoored model fine-tuned on the clean subset, CE only.
  # source 'scratch': a fresh model trained on the clean subset instead (an ablation).
  config.teacher = sgd_stage(10, 64, 0.1, lr_boundaries=(2,), cutout=3, source='finetune',
                             checkpoint=ml_collections.config_dict.placeholder(str))
  # NAD: 20 epochs, lr 0.1 for epochs 0-1 then 0.01; crop + flip + one 3x3 Cutout hole.
  config.nad = sgd_stage(20, 64, 0.1, lr_boundaries=(2,), cutout=3,
                         betas=(500.0, 1000.0, 1000.0), p=2.0,
                         layers=ml_collections.config_dict.placeholder(tuple))
  return config


ATTACK_VARIANTS = ('badnets', 'all2all', 'trojan', 'blend', 'sig', 'cl', 'refool', 'wanet')
CLEAN_LABEL_RATE = 0.8  # share of the target class, as the NAD code's SIG (8% of CIFAR-10)
CLEAN_LABEL_VARIANTS = ('sig', 'cl', 'refool')
# CL's clean model for the PGD perturbation: the victim's architecture, 20 epochs.
WRN_SURROGATE = dict(model='wrn16_1', epochs=20, learning_rate=0.1, lr_boundaries=(10, 15))


def set_attack(config: ml_collections.ConfigDict, variant: str | None,
               config_file: str) -> ml_collections.ConfigDict:
  """Selects the attack named by a config variant (`configs/<file>.py:<variant>`).

  'all2all' is BadNets with mode all_to_all. The clean-label attacks (sig, cl,
  refool) poison CLEAN_LABEL_RATE of the target class's images.
  """
  if variant in (None, ''):
    return config
  if variant not in ATTACK_VARIANTS:
    raise ValueError(f'{config_file} has no variant {variant!r}; choose one of {ATTACK_VARIANTS}')
  if variant == 'all2all':
    config.attack.name, config.attack.mode = 'badnets', 'all_to_all'
  else:
    config.attack.name = variant
  if variant in CLEAN_LABEL_VARIANTS:
    config.attack.poison_rate = CLEAN_LABEL_RATE
  return config
