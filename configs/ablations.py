"""NAD ablations on the synthetic quickstart data (configs/quickstart.py), one variant each:

  fraction_0.01, fraction_0.05 (the paper's default: exactly configs/quickstart.py),
  fraction_0.1, fraction_0.2: the share of the training set the defender holds as clean
      data; fraction_0.01's 50 clean images cannot fill two batches of 64, so that variant
      trains teacher and NAD at batch 16 (the variant sets it for the quickstart's 5,000
      images; a --config.data.train_size override does not change it);
  teacher_finetune (the paper's: the backdoored model fine-tuned on the clean subset),
  teacher_scratch (an independently trained clean model: a fresh network trained on
      the clean subset only, 20 epochs);
  layers_group1, layers_group2, layers_group3 (one distilled layer, with its paper
      beta), layers_all (the three, the default).

python main.py --config=configs/ablations.py:fraction_0.01 --workdir=runs/ablation_f001
To share one backdoored model between variants, point them at it:
  --config.student.checkpoint=runs/ablation_f001/backdoored
"""


from configs import quickstart

FRACTIONS = ('0.01', '0.05', '0.1', '0.2')
BETAS = {'group1': 500.0, 'group2': 1000.0, 'group3': 1000.0}
VARIANTS = (*(f'fraction_{f}' for f in FRACTIONS), 'teacher_finetune', 'teacher_scratch',
            'layers_group1', 'layers_group2', 'layers_group3', 'layers_all')


def get_config(arg=None):
  arg = arg or 'fraction_0.05'
  if arg not in VARIANTS:
    raise ValueError(f'configs/ablations.py has no variant {arg!r}; choose one of {VARIANTS}')
  config = quickstart.get_config()
  if arg.startswith('fraction_'):
    config.data.clean_fraction = float(arg.split('_')[1])
    count = int(round(config.data.clean_fraction * config.data.train_size))
    if count < 2 * config.nad.batch_size:  # 1%: 50 images, not two batches of 64
      config.nad.batch_size = config.teacher.batch_size = 16
  elif arg == 'teacher_scratch':
    config.teacher.update(dict(epochs=20, batch_size=64, learning_rate=0.1,
                               lr_boundaries=(10, 15), source='scratch'))
  elif arg.startswith('layers_group'):
    layer = arg.split('_')[1]
    config.nad.layers = (layer,)
    config.nad.betas = (BETAS[layer],)
  return config
