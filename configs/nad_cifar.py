"""NAD on CIFAR-10 as in the paper (WRN-16-1, BadNets grid, target 5, 10% poisoned).

python main.py --config=configs/nad_cifar.py --workdir=runs/cifar
Attacks: configs/nad_cifar.py:ATTACK with ATTACK one of badnets (default), all2all,
trojan, blend, sig, cl, refool, wanet (nad_jax/attacks/ documents each).
The NAD authors' Trojan trigger: configs/nad_cifar.py:trojan with
  --config.attack.pattern_path=../shared/data/nad-official/best_square_trigger_cifar10.npz
The local JPEG copy: --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg
"""

from nad_jax import defaults


def get_config(arg=None):
  config = defaults.paper_config()
  return defaults.set_attack(config, arg, 'configs/nad_cifar.py')
