"""NAD on CIFAR-10 as in the paper (WRN-16-1, BadNets grid, target 5, 10% poisoned).

python main.py --config=configs/nad_cifar.py --workdir=runs/cifar
The local JPEG copy: --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg
"""

from configs import common


def get_config(arg=None):
  config = common.paper_config()
  if arg not in (None, '', 'badnets'):
    raise ValueError(f'configs/nad_cifar.py has no variant {arg!r}; choose badnets')
  return config
