"""The paper's defaults: every config field, its default and what it means, in one place.

`configs/*.py` and the Python API (nad_jax.api) start from `paper_config()`.
"""

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
      lr_boundaries=(lr_boundaries if isinstance(lr_boundaries, ml_collections.FieldReference)
                     else tuple(lr_boundaries)), lr_decay=lr_decay, momentum=0.9, nesterov=True,
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


def defense_stages(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the fine-pruning (`fp`) and MCR (`mcr`) sections; FT is `nad` with betas 0.

  FP and MCR follow NAD's schedule by reference, so a later change of `nad.epochs`,
  `nad.batch_size`, ... reaches every defense.

  Args:
    config: a config with a `nad` section; changed in place.

  Returns:
    `config`.
  """
  nad = lambda field: config.nad.get_ref(field)
  # FP: prune (held-out acc may fall by acc_drop points), then fine-tune with NAD's schedule.
  config.fp = sgd_stage(nad('epochs'), nad('batch_size'), nad('learning_rate'),
                        lr_boundaries=nad('lr_boundaries'), cutout=nad('cutout'),
                        holdout_fraction=0.2, acc_drop=5.0, eval_every=nad('eval_every'))
  # MCR: the Bezier control point, t ~ U(0, 1) per step; the curve read at t (paper: 0.3)
  # and evaluated at `points` equally spaced t; lr x0.1 halfway.
  config.mcr = sgd_stage(nad('epochs'), nad('batch_size'), 0.02,
                         lr_boundaries=(config.nad.epochs // 2,), t=0.3, points=11,
                         eval_every=nad('eval_every'))
  return config
