"""The paper's defaults: every config field, its default and what it means, in one place
(the attack's fields: nad_jax/attacks/core.py DEFAULTS).

`configs/*.py` and the Python API (nad_jax.api) start from `paper_config()`.
"""

import copy

import ml_collections

from nad_jax import attacks


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
  # Several seeds side by side: (0, 1, 2) trains a replica per seed in one program and
  # reports each seed and their mean and sample std. Empty: the one seed `seed`.
  config.seeds = ()
  config.eval_only = False
  # nad_jax/experiments: 'nad' (the NAD pipeline) or 'table1' (configs/table1.py)
  config.runner = 'nad'
  # Several processes as one run (multi-host TPU/GPU; docs/multihost.md). enabled: join the
  # others through jax.distributed.initialize before JAX starts. Unset addressing fields
  # ('' / None) are detected by JAX on Cloud TPU, SLURM and Open MPI.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False,
      coordinator_address='',  # 'host:port' of process 0, the same for every process
      num_processes=ml_collections.config_dict.placeholder(int),
      process_id=ml_collections.config_dict.placeholder(int),  # 0 .. num_processes - 1
      local_device_ids=ml_collections.config_dict.placeholder(tuple),  # GPUs: None = all
      initialization_timeout=300,  # seconds to wait for every process to connect
      heartbeat_timeout=100))  # seconds of silence after which a process counts as dead
  # JAX's persistent compilation cache: a rerun or a resumed run loads its compiled steps
  # instead of compiling them again. '' turns it off.
  config.compilation_cache = '~/.cache/nad_jax/xla'
  # One dispatch per epoch (lax.scan over steps): None picks it on GPU/TPU, not on CPU.
  config.scan_epoch = ml_collections.config_dict.placeholder(bool)

  config.model = ml_collections.ConfigDict(dict(
      # dtype 'bfloat16': computation in bf16; params, BatchNorm statistics, logits float32
      # (on CPU with oneDNN's convolutions: native bf16 where the CPU has it, else float32).
      name='wrn16_1', dtype='float32',
      # 'auto': oneDNN's convolutions on one CPU device where they build (pip install -e
      # '.[onednn]' and g++), else XLA's, saying why in one line; 'xla'; 'onednn' (or an error).
      conv='auto',
      # Input scaling: pixels / 255, then (x - mean) / std when both are set.
      mean=ml_collections.config_dict.placeholder(tuple),
      std=ml_collections.config_dict.placeholder(tuple)))

  config.data = ml_collections.ConfigDict(dict(
      source='tfds', name='cifar10', data_dir=ml_collections.config_dict.placeholder(str),
      path='', train_size=50_000, test_size=10_000, num_classes=10,
      clean_fraction=0.05, eval_batch_size=1000,
      textures_per_class=1,  # synthetic: how many textures a class draws its images from
      seed=0))  # synthetic: the images' seed (the run's seeds do not change the data)

  # The attack's fields and defaults: nad_jax/attacks/core.py DEFAULTS; each attack module
  # documents the fields it reads and its source paper.
  attack = {**attacks.DEFAULTS, 'clean_label': ml_collections.config_dict.placeholder(bool),
            'surrogate': ml_collections.ConfigDict(attacks.DEFAULTS['surrogate'])}
  config.attack = ml_collections.ConfigDict(attack)

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


# The `nad` fields FP's section follows by reference (defense_stages).
FP_FOLLOWED = ('epochs', 'batch_size', 'learning_rate', 'lr_boundaries', 'cutout', 'eval_every')


def fp_follows(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The FP_FOLLOWED fields that `config.fp` still follows: those whose reference to
  `config.nad` no assignment to `fp` has replaced.

  Args:
    config: a config with `nad` and `fp` sections; not changed.

  Returns:
    Field names, e.g. ('batch_size', 'learning_rate', ...) after `fp.epochs = 3`.
  """
  probe = copy.deepcopy(config)  # a deep copy keeps the references
  def moves_fp(field, step):  # FP's field takes a new value of NAD's
    value = config.nad[field]
    probe.nad[field] = value + (0,) * step if isinstance(value, tuple) else value + step
    return probe.fp[field] == probe.nad[field]
  return tuple(f for f in FP_FOLLOWED if moves_fp(f, 1) and moves_fp(f, 2))  # twice: no tie


def defense_stages(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the fine-pruning (`fp`) and MCR (`mcr`) sections; FT is `nad` with betas 0.

  FP follows NAD's schedule by one-way reference: a later change of `nad.epochs`,
  `nad.batch_size`, ... reaches it, and setting a field of `fp` changes FP only. MCR
  trains its curve with its own recipe, that of Zhao et al.'s code
  (nad_jax/defenses/mcr.py cites it); only the curve's FT end follows `nad`.

  Args:
    config: a config with a `nad` section; changed in place.

  Returns:
    `config`.
  """
  nad = lambda field: config.nad.get_oneway_ref(field)
  # FP: prune (held-out acc may fall by acc_drop points), then fine-tune with NAD's schedule.
  config.fp = sgd_stage(nad('epochs'), nad('batch_size'), nad('learning_rate'),
                        lr_boundaries=nad('lr_boundaries'), cutout=nad('cutout'),
                        holdout_fraction=0.2, acc_drop=5.0, eval_every=nad('eval_every'))
  # MCR: the Bezier control point, t ~ U(0, 1) per step, the curve read at t and evaluated
  # at `points` equally spaced t. The authors' recipe: 100 epochs of `samples_per_epoch`
  # samples (the clean subset repeated), batch 128, SGD momentum 0.9 (not Nesterov), lr 0.01
  # held for half the epochs, then linearly down to 1% of it at 90% (lr_schedule 'curve'),
  # L2 1e-4 on the curve's point, no augmentation. Evaluated and checkpointed every 10 epochs.
  config.mcr = sgd_stage(100, 128, 0.01, crop_flip=False, eval_every=10, lr_schedule='curve',
                         samples_per_epoch=10_000, t=0.3, points=11)
  config.mcr.nesterov = False
  return config


# ------------------------------------------------------------------------- attack variants

ATTACK_VARIANTS = ('badnets', 'all2all', 'trojan', 'blend', 'sig', 'cl', 'refool', 'wanet')
CLEAN_LABEL_RATE = 0.8  # share of the target class, as the NAD code's SIG (8% of CIFAR-10)
CLEAN_LABEL_VARIANTS = ('sig', 'cl', 'refool')
# CL's clean model for the PGD perturbation: the victim's architecture, 20 epochs. PGD
# against the tiny surrogate transferred weakly to WRN-16-1 on the quickstart's data (ASR
# 78-90 over seeds 0-2); against the victim's own architecture it transfers better.
WRN_SURROGATE = dict(model='wrn16_1', epochs=20, learning_rate=0.1, lr_boundaries=(10, 15))


def set_attack(config: ml_collections.ConfigDict, variant: str | None,
               source: str = 'attack') -> ml_collections.ConfigDict:
  """Selects the attack a variant names (`configs/<file>.py:<variant>`, the API's `attack=`).

  'all2all' is BadNets with mode all_to_all. The clean-label attacks (sig, cl,
  refool) poison CLEAN_LABEL_RATE of the target class's images, the others
  `attack.poison_rate` (10%) of the training set; CL perturbs against WRN_SURROGATE. The
  configs add their own per-attack stage settings on top (configs/quickstart.py).

  Args:
    config: changed in place.
    variant: one of ATTACK_VARIANTS; None or '' leaves `config` as it is.
    source: what named the variant, for the message.

  Returns:
    `config`.

  Raises:
    ValueError: an unknown variant.
  """
  if variant in (None, ''):
    return config
  if variant not in ATTACK_VARIANTS:
    raise ValueError(f'{source} has no variant {variant!r}; choose one of {ATTACK_VARIANTS}')
  if variant == 'all2all':
    config.attack.name, config.attack.mode = 'badnets', 'all_to_all'
  else:
    config.attack.name, config.attack.mode = variant, 'all_to_one'
  if variant in CLEAN_LABEL_VARIANTS:
    config.attack.poison_rate = CLEAN_LABEL_RATE
  if variant == 'cl':
    config.attack.surrogate.update(WRN_SURROGATE)
  return config
