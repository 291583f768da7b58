"""BackdoorBench's CIFAR-10 setting: PreAct-ResNet-18, target 0, 10% poisoned, its NAD recipe.

python main.py --config=configs/backdoorbench.py:ATTACK --workdir=runs/bb_ATTACK
ATTACK: badnets (default), blend, sig, wanet. The comparison table with FT, FP and MCR:
configs/table1.py:backdoorbench,badnets,blend,sig,wanet. The local JPEG copy:
--config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg

The settings follow SCLBD/BackdoorBench (v2): config/attack/prototype/cifar10.yaml (the
training recipe), config/attack/{badnet,blended,sig,wanet}/default.yaml (the triggers),
config/defense/nad/cifar10.yaml with defense/nad.py (the defense) and
utils/aggregate_block/{dataset_and_transform_generate,train_settings_generate}.py
(augmentation, normalisation, optimiser, schedule).

Departures (what nad-jax cannot make, or does otherwise):
- Blend: BackdoorBench blends resource/blended/hello_kitty.jpeg, which nad-jax does not
  ship; the default here is nad-jax's fixed uniform-noise pattern (nad_jax/attacks/blend.py).
  BackdoorBench's image: --config.attack.pattern_path=PATH/hello_kitty.jpeg (resized to
  32x32 bilinearly by Pillow, as its ToPILImage + Resize does).
- SIG: the leaderboard's row poisons 5% of the training set, which BackdoorBench takes
  from the target class (clean label): half of class 0, attack.poison_rate 0.5 here (a
  share of the target class). Its default.yaml's pratio 0.1 is the whole class (1.0).
- WaNet: BackdoorBench warps 10% of each batch afresh (and 20% with noise) and augments
  with its own transforms (random crop with padding 5 at p 0.8, rotation of 10 degrees at
  p 0.5, flip); nad-jax warps a fixed 10% of the training set and its 20% noise-mode
  samples once, then crops (padding 4) and flips every image, as for the other attacks.
- NAD's maps: BackdoorBench cuts PreAct-ResNet-18 into `children()[:-k]`, so its maps
  are layer3 (beta 500), layer4 (beta 1000) and the global average pool (beta 1000): a
  1x1 map, equal after normalisation for student and teacher, so its third term is 0 and
  its loss is CE + 500 AT(layer3) + 1000 AT(layer4). nad-jax distils the model's groups,
  group2, group3 and group4 (layer2-4) with 500, 1000, 1000: each term is live.
  BackdoorBench's effective loss: --config.nad.layers="('group3','group4')"
  --config.nad.betas="(500.,1000.)".
- Precision: BackdoorBench's NAD runs under PyTorch AMP (float16); nad-jax in float32
  (--config.model.dtype=bfloat16 is its mixed precision).
- The teacher: BackdoorBench's CosineAnnealingLR keeps T_max 100 for its 10 epochs (lr
  0.01 to 0.0098); here the teacher's lr is held at 0.01. The NAD stage holds 0.01 in both
  (defense/nad.py's adjust_learning_rate).
"""

from nad_jax import defaults

VARIANTS = ('badnets', 'blend', 'sig', 'wanet')
# utils/aggregate_block/dataset_and_transform_generate.py get_dataset_normalization('cifar10')
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
# config/attack/<attack>/default.yaml, in nad-jax's fields (nad_jax/attacks/core.py DEFAULTS).
ATTACKS = {
    # resource/badnet/trigger_image.png: a 3x3 white square in the bottom-right corner
    'badnets': dict(pattern='square', size=3, corner='bottom_right'),
    'blend': dict(alpha=0.2),  # attack_train_blended_alpha = attack_test_blended_alpha
    # sig_delta 40, sig_f 6, added and clipped; 5% of the training set = half of class 0
    'sig': dict(delta=40.0, frequency=6.0, sig_mode='add', poison_rate=0.5),
    'wanet': dict(warp_k=4, warp_strength=0.5, cross_ratio=2.0),  # k 4, s 0.5, grid_rescale 1
}


# One training stage's optimiser and augmentation: SGD lr 0.01, momentum 0.9 (not Nesterov),
# weight decay 5e-4, random crop (padding 4) + horizontal flip, no Cutout
# (config/attack/prototype/cifar10.yaml; utils/aggregate_block/train_settings_generate.py).
SGD = dict(learning_rate=0.01, lr_boundaries=(), momentum=0.9, nesterov=False,
           weight_decay=5e-4, crop_flip=True, cutout=0)


def get_config(arg=None):
  if arg not in (None, '', *VARIANTS):
    raise ValueError(f'configs/backdoorbench.py has no variant {arg!r}; choose one of {VARIANTS}')
  variant = arg or 'badnets'
  config = defaults.paper_config()
  config.model.update(dict(name='preact_resnet18', mean=CIFAR10_MEAN, std=CIFAR10_STD))
  config.attack.target_label = 0
  # 100 epochs, batch 128, cosine annealing (T_max 100, stepped per epoch); WaNet's own
  # config/attack/wanet/default.yaml sets MultiStepLR at 100, 200, ...: lr 0.01 throughout.
  config.backdoor_training.update(dict(SGD, epochs=100, batch_size=128))
  config.backdoor_training.lr_schedule = 'step' if variant == 'wanet' else 'cosine'
  # defense/nad.py: the teacher, then the student, each train te_epochs (10) on ratio 0.05
  # of the clean training set at batch 256; the student at lr 0.01 throughout, with
  # beta1-3 500, 1000, 1000 and p 2 (the paper's defaults, kept).
  config.teacher.update(dict(SGD, epochs=10, batch_size=256))
  config.nad.update(dict(SGD, epochs=10, batch_size=256))
  config = defaults.set_attack(config, variant, 'configs/backdoorbench.py')
  config.attack.update(ATTACKS[variant])
  return config
