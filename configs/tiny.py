"""A seconds-long smoke run of the whole pipeline (tests use it): tiny net, tiny synthetic data.

python main.py --config=configs/tiny.py --workdir=runs/tiny
"""


from nad_jax import defaults


def get_config(arg=None):
  if arg:
    raise ValueError(f'configs/tiny.py takes no variant, got {arg!r}')
  config = defaults.paper_config()
  config.model.name = 'tiny'
  config.data.source = 'synthetic'
  config.data.train_size = 512
  config.data.test_size = 256
  config.data.clean_fraction = 0.25
  config.data.eval_batch_size = 128
  config.backdoor_training = defaults.sgd_stage(2, 32, 0.05, crop_flip=False)
  config.teacher.update(dict(epochs=2, batch_size=32, learning_rate=0.05, lr_boundaries=(1,)))
  config.nad.epochs = 2
  config.nad.batch_size = 32
  config.nad.lr_boundaries = (1,)
  return config
