"""Runs the NAD pipeline (or, with config.runner 'table1', the defense comparison):

python main.py --config=configs/quickstart.py --workdir=runs/q
"""

import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nad_jax import pipeline
from nad_jax.defenses import table

RUNNERS = {'nad': pipeline.run, 'table1': table.run}

FLAGS = flags.DEFINE_string('workdir', None, 'Where checkpoints and results.json go.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:variant].',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
  config = flags.FLAGS.config
  if config.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache))
  try:
    if config.distributed:
      jax.distributed.initialize()
    run = pipeline.evaluate_only if config.eval_only else RUNNERS.get(config.runner)
    if run is None:
      raise pipeline.ConfigError(f'runner {config.runner!r} is unknown; '
                                 f'choose one of {sorted(RUNNERS)}')
    run(config, FLAGS.value)
  except (pipeline.ConfigError, FloatingPointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
