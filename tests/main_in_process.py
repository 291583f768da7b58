"""main.py run inside the test's own process: its flag parsing and main(). The run shares
the process's compiled programs, which a subprocess would compile again."""

import sys

from absl import flags

import main


def parsed(args) -> list[str]:
  """absl's parsing of `main.py *args` through main.parse_flags; config_flags finds the
  `--config.<field>` overrides in sys.argv, so it is set for the call, and defines one
  flag per override, so those of an earlier parse are removed first."""
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  argv, sys.argv = sys.argv, ['main.py', *args]
  try:
    return main.parse_flags(sys.argv)
  finally:
    sys.argv = argv


def run_main(args) -> str | None:
  """main.py's main() on `args`: the `error: ...` line of a refused run, None for a run
  that ended normally."""
  try:
    main.main(parsed(args))
  except SystemExit as exit_:
    return str(exit_.code)
  finally:
    flags.FLAGS.unparse_flags()
  return None
