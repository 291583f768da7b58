"""Runs the NAD pipeline (or, with config.runner 'table1', the defense comparison):

python main.py --config=configs/quickstart.py --workdir=runs/q
"""

import os
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nad_jax import distributed
from nad_jax import validation
from nad_jax.experiments import nad
from nad_jax.experiments import table1


class Runner(NamedTuple):
  """What `config.runner` names: `run(config, workdir)` trains (or resumes) and writes the
  results; `evaluate_only(config, workdir)` is its `config.eval_only` mode (restore,
  evaluate, write, train nothing); `check_overrides(config, fields)` raises ConfigError
  for a command-line override (`--config.<field>`) that the run would not use."""
  run: Callable
  evaluate_only: Callable
  check_overrides: Callable = lambda config, fields: None


RUNNERS = {'nad': Runner(nad.run, nad.evaluate_only, nad.check_overrides),
           'table1': Runner(table1.run, table1.evaluate_only, table1.check_overrides)}

FLAGS = flags.DEFINE_string('workdir', None, 'Where checkpoints and results.json go.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:variant].',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error a user can cause (a missing config file, an
  unknown variant or field, a value of the wrong type) as one line and exit status 1."""
  try:
    args = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config file loads lazily: fail here, not later
    return args
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(str))
      detail = detail.args[0]
    lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
    if isinstance(e, (AttributeError, KeyError)):
      message = 'unknown config field ' + ' '.join(lines)
    else:  # the last line names the cause, also where a config file's traceback is quoted
      message = re.sub(r'^\w+(Error|Exception): ', '', lines[-1] if lines else repr(e))
    sys.exit(f'error: {message}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
  config = flags.FLAGS.config
  if config.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache))
  try:
    validation.validate(config, 'distributed')  # before JAX starts a backend
    distributed.initialize(config.distributed)
    validation.validate(config)
    overrides = tuple(config_flags.get_override_values(flags.FLAGS['config']))
    validation.refuse_unread_fields(config, 'data', overrides)
    validation.check_folder(FLAGS.value, '--workdir')
    runner = RUNNERS[config.runner]
    runner.check_overrides(config, overrides)
    (runner.evaluate_only if config.eval_only else runner.run)(config, FLAGS.value)
  except (validation.ConfigError, distributed.DistributedError, FloatingPointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
