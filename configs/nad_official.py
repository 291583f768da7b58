"""NAD on the NAD authors' released backdoored WRN-16-1, on the local JPEG CIFAR-10.

The student (BadNets grid -> label 5) and teacher are their PyTorch checkpoints,
imported by nad_jax.torch_io; NAD then runs with the paper's hyperparameters.
Run from the repository root:

  python main.py --config=configs/nad_official.py --workdir=/tmp/nad_official
  # the teacher fine-tuned here on the 5% clean subset (10 epochs) instead of theirs:
  python main.py --config=configs/nad_official.py:finetuned_teacher --workdir=/tmp/nad_official_ft
  # the erased model as a PyTorch state_dict:
  python -m nad_jax.torch_io export /tmp/nad_official/nad /tmp/nad_official/nad_model.pth
"""

from nad_jax import defaults

OFFICIAL = '../shared/data/nad-official'


def get_config(arg=None):
  if arg not in (None, '', 'official_teacher', 'finetuned_teacher'):
    raise ValueError(f'configs/nad_official.py has no variant {arg!r}; '
                     'choose official_teacher (default) or finetuned_teacher')
  config = defaults.paper_config()
  config.data.source = 'folder'
  config.data.path = '../shared/data/cifar10-jpeg'
  config.model.name = 'wrn16_1'
  config.model.mean = None  # the authors' models take RGB in [0, 1], unnormalised
  config.model.std = None
  config.student.checkpoint = f'{OFFICIAL}/WRN-16-1-S-model_best.pth.tar'
  config.teacher.checkpoint = (None if arg == 'finetuned_teacher'
                               else f'{OFFICIAL}/WRN-16-1-T-model_best.pth.tar')
  return config
