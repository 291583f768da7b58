"""nad-jax-clean: erase the backdoor of a trained image classifier and measure it.

  nad-jax-clean MODEL --data DIR|tfds:NAME [--arch NAME] [--poisoned PATH | --attack NAME]
                [--method nad] [--epochs N] [--out DIR] ...

MODEL is a BackdoorBench record, a PyTorch state_dict file or a nad-jax stage
folder; the defense (NAD by default) fine-tunes it on a clean subset of --data
and the cleaned model, the BackdoorBench defense result (for a record),
results.json and report.md go to --out (nad_jax/experiments/clean.py). Every
option maps to one field of the config `nad_jax.defaults.paper_config()` builds
(named in --help); `--set FIELD=VALUE` sets any other. Installed as the console
script `nad-jax-clean`; `python -m nad_jax.cli` is the same.
"""

import argparse
import ast
import difflib
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import logging

from nad_jax import backdoorbench
from nad_jax import defaults
from nad_jax import models
from nad_jax import stages
from nad_jax import validation
from nad_jax.attacks import ATTACKS
from nad_jax.experiments import clean

PROG = 'nad-jax-clean'
# Built-in attacks that can trigger clean test images ('files' is --poisoned).
TRIGGERS = tuple(sorted(name for name in ATTACKS if name != 'files'))
# The fields an option sets, refused by --set: the option also records the input it names
# (results.json 'input', report.md), which --set would change behind that record.
OPTION_FIELDS = {
    'student.checkpoint': 'MODEL', 'data.source': '--data', 'data.path': '--data',
    'data.name': '--data tfds:NAME', 'data.data_dir': '--tfds-dir',
    'data.clean_fraction': '--clean-fraction', 'model.name': '--arch', 'model.mean': '--mean',
    'model.std': '--std', 'teacher.checkpoint': '--teacher',
    'attack.name': '--attack or --poisoned', 'attack.path': '--poisoned',
    'attack.target_label': '--target-label', 'attack.mode': '--all-to-all (or --target-label)',
    'seed': '--seed'}


class UsageError(Exception):
  """A command line the user can fix; the message names the option or file."""


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one `error: ...` line and exit status 1."""

  def error(self, message):
    raise UsageError(f'{message} (see {PROG} --help)')


def parser() -> argparse.ArgumentParser:
  """The command line's options, each documented for --help.

  Returns:
    The ArgumentParser; `parse_args` raises UsageError on a bad command line.
  """
  p = Parser(
      prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description='Erase the backdoor of a trained image classifier with Neural Attention\n'
                  'Distillation (NAD, Li et al., ICLR 2021) or a baseline defense, and measure\n'
                  'clean accuracy and attack success rate before and after. In brackets: the\n'
                  'config field an option sets.',
      epilog='examples:\n'
             f'  {PROG} record/badnet_demo --data cifar10/ --out cleaned/\n'
             f'  {PROG} model.pth --arch preact_resnet18 --data tfds:cifar10 \\\n'
             '      --mean 0.4914,0.4822,0.4465 --std 0.247,0.243,0.261 \\\n'
             '      --attack badnets --target-label 0\n\n'
             'Writes into --out: cleaned.pth (a PyTorch state_dict); for a record,\n'
             'defense/<method>/defense_result.pt and <method>_df.csv (BackdoorBench\'s);\n'
             'results.json; report.md; curves.png and attention.png (with matplotlib);\n'
             'checkpoints/ (rerunning the same command resumes). Errors: one line\n'
             '"error: ...", exit status 1, nothing written. Docs: docs/clean.md.')
  p.add_argument('model', metavar='MODEL',
                 help='the backdoored model: a BackdoorBench record (its folder record/<name> '
                      'or its attack_result.pt: the architecture, input scaling, class count '
                      'and poisoned test images come from it), a PyTorch file (.pth, .pt, '
                      '.pth.tar: a state_dict, or a dict holding one under "state_dict"; give '
                      '--arch and --mean/--std) or a nad-jax stage folder (give --arch) '
                      '[student.checkpoint]')
  data = p.add_argument_group('clean data')
  data.add_argument('--data', required=True, metavar='DIR|tfds:NAME',
                    help='an image folder DIR/{train,test}/<class>/<image> (classes sorted by '
                         'name) or tfds:NAME, a TensorFlow Datasets name (pip install '
                         '"nad-jax[tfds]"). The defense trains on --clean-fraction of the '
                         'training split; the test split measures acc [data.source, data.path, '
                         'data.name]')
  data.add_argument('--tfds-dir', metavar='DIR',
                    help='where TensorFlow Datasets keeps its data (default ~/tensorflow_datasets;'
                         ' only with --data tfds:NAME) [data.data_dir]')
  data.add_argument('--clean-fraction', type=float, metavar='F',
                    help='the share of the training split the defense trains on, drawn from '
                         '--seed (default 0.05; 1 for a folder that holds only your clean '
                         'images) [data.clean_fraction]')
  model = p.add_argument_group('model')
  model.add_argument('--arch', metavar='NAME',
                     help=f'the architecture: one of {", ".join(sorted(models.MODELS))} '
                          '(default wrn16_1; a record sets it) [model.name]')
  model.add_argument('--mean', metavar='M,M,M',
                     help='per-channel input mean on the [0, 1] scale: the model sees '
                          '(pixels / 255 - mean) / std (default: none, pixels / 255; a record '
                          'sets it) [model.mean]')
  model.add_argument('--std', metavar='S,S,S',
                     help='per-channel input standard deviation, with --mean [model.std]')
  model.add_argument('--teacher', metavar='PATH',
                     help="NAD's teacher, as MODEL (default: MODEL fine-tuned on the clean "
                          'subset for --teacher-epochs) [teacher.checkpoint]')
  backdoor = p.add_argument_group(
      'attack success rate (a record brings its poisoned test images; otherwise give one)')
  backdoor.add_argument('--poisoned', metavar='PATH',
                        help='poisoned test images: a BackdoorBench record, an .npz with '
                             'images, labels (backdoor labels) and original_labels, or a folder '
                             'PATH/<true label index>/<image> (needs --target-label) '
                             "[attack.name 'files', attack.path]")
  backdoor.add_argument('--attack', choices=TRIGGERS, metavar='NAME',
                        help='a built-in trigger applied to the clean test images: '
                             f'{", ".join(TRIGGERS)} (needs --target-label; its settings: '
                             '--set attack.FIELD=VALUE, docs/attacks.md) [attack.name]')
  backdoor.add_argument('--target-label', type=int, metavar='N',
                        help='the backdoor\'s target class (default: read from the labels of a '
                             'record or .npz) [attack.target_label]')
  backdoor.add_argument('--all-to-all', action='store_true',
                        help='the backdoor maps class y to y + 1 (default: all-to-one; read '
                             'from a record or .npz; not with --target-label) '
                             "[attack.mode 'all_to_all']")
  defense = p.add_argument_group('defense')
  defense.add_argument('--method', default='nad', choices=clean.METHODS,
                       help='nad (default): attention distillation from a teacher; ft: '
                            'fine-tuning; fp: fine-pruning; mcr: mode connectivity repair')
  defense.add_argument('--epochs', type=int, metavar='N',
                       help="the defense's epochs (default 20; mcr: the curve's, default "
                            '100) [nad.epochs, FP follows; mcr: mcr.epochs]')
  defense.add_argument('--teacher-epochs', type=int, metavar='N',
                       help="NAD's teacher's fine-tuning epochs (default 10; not with "
                            '--teacher) [teacher.epochs]')
  defense.add_argument('--batch-size', type=int, metavar='N',
                       help='training batch size, a multiple of the device count (default '
                            '64; mcr: 128) [nad.batch_size, teacher.batch_size (a teacher trained '
                            'here); mcr: mcr.batch_size]')
  defense.add_argument('--lr', type=float, metavar='X',
                       help='initial learning rate, x0.1 from epoch 2 (default 0.1; mcr: '
                            '0.01, held for half the epochs, then down to 1%%) '
                            '[nad.learning_rate, teacher.learning_rate (a teacher trained here); '
                            'mcr: mcr.learning_rate]')
  defense.add_argument('--seed', type=int, metavar='N',
                       help='every random choice: the clean subset, batches, augmentation '
                            '(default 0) [seed]')
  defense.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                       help='any other config field the run reads (nad_jax/defaults.py, '
                            'docs/configuration.md): model.*, data.*, attack.*, nad.* '
                            '(FT, FP and MCR\'s FT end train with it), teacher.* (nad without '
                            '--teacher), fp.* (fp), mcr.* (mcr); a Python literal or a string; '
                            'repeatable, e.g. --set nad.betas=(500,1000,1000) '
                            '--set data.eval_batch_size=500. Refused: a field that --epochs, '
                            '--teacher-epochs, --batch-size, --lr or --eval-every also sets in '
                            'this run, the fields of MODEL, --data, '
                            '--tfds-dir, --clean-fraction, --arch, --mean, --std, --teacher, '
                            '--poisoned, --attack, --target-label, --all-to-all and --seed (give '
                            'the option), seeds, eval_only, runner, '
                            'distributed.*, backdoor_training.*, attack.poison_rate, '
                            'attack.clean_label, the sections of another method, nad.betas but '
                            'for nad')
  output = p.add_argument_group('output')
  output.add_argument('--out', default='cleaned', metavar='DIR',
                      help='the output folder (default ./cleaned)')
  output.add_argument('--eval-every', type=int, metavar='N',
                      help='evaluate (and checkpoint) every N epochs and after the last '
                           '(default 1; mcr: 10) [nad.eval_every, teacher.eval_every (a teacher '
                           'trained here); mcr: mcr.eval_every]')
  output.add_argument('--attention-images', type=int, default=clean.ATTENTION_IMAGES,
                      metavar='N', help='triggered test images in attention.png (default '
                                        f'{clean.ATTENTION_IMAGES}; 0: no figure)')
  return p


def numbers(text: str, option: str) -> tuple[float, ...]:
  """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); UsageError naming `option` otherwise."""
  try:
    return tuple(float(v) for v in text.split(','))
  except ValueError:
    raise UsageError(f'{option} {text!r}: expected comma-separated numbers, e.g. '
                     '0.4914,0.4822,0.4465') from None


def label_map(labels: np.ndarray, originals: np.ndarray, where: str) -> tuple[str, int]:
  """(attack.mode, attack.target_label) that poisoned test labels follow.

  Args:
    labels: backdoor labels of the poisoned test images.
    originals: their true labels.
    where: what holds them, for the message.

  Returns:
    ('all_to_one', the one backdoor label) or ('all_to_all', 0) where every
    changed label is the true label + 1 (or 0, wrapped around).

  Raises:
    UsageError: no image changes label, or the labels follow neither map.
  """
  changed = labels != originals
  if not changed.any():
    raise UsageError(f'{where}: no poisoned test image has a backdoor label other than its own')
  targets = np.unique(labels[changed])
  if len(targets) == 1:
    return 'all_to_one', int(targets[0])
  if np.all((labels[changed] == originals[changed] + 1) | (labels[changed] == 0)):
    return 'all_to_all', 0
  raise UsageError(f'{where}: its backdoor labels follow neither an all-to-one nor an '
                   'all-to-all (y -> y + 1) map; give --target-label (and --all-to-all)')


def poisoned_labels(path: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(backdoor labels, true labels) of --poisoned PATH where the file holds them (a record
  or an .npz); None for a folder, whose backdoor labels come from --target-label."""
  if stages.is_record(path):
    try:
      test = backdoorbench.read_bd_test(path)
    except backdoorbench.RecordError as e:
      raise UsageError(f'--poisoned: {e}') from None
    return test.labels, test.original_labels
  if os.path.isdir(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return arrays['labels'], arrays['original_labels']
  except Exception as e:  # pylint: disable=broad-except  (zip, format and key errors)
    raise UsageError(f'--poisoned {path} is not an .npz with labels and original_labels '
                     f'({type(e).__name__}: {e})') from None


def set_field(config, assignment: str) -> None:
  """Applies one `--set FIELD=VALUE` to `config` (in place).

  Raises:
    UsageError: no '=', a field an option sets (OPTION_FIELDS), a field no cleaning
      reads (clean.unread_fields), a whole section, an unknown field (with the closest
      name), or a value of the wrong type for the field.
  """
  field, sep, text = assignment.partition('=')
  if not sep:
    raise UsageError(f'--set {assignment!r}: expected FIELD=VALUE, e.g. nad.epochs=5')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a plain string, e.g. --set attack.pattern=square
  field = field.strip()
  if field in OPTION_FIELDS:
    raise UsageError(f'--set {field}: it has its own option; give {OPTION_FIELDS[field]}')
  unread = clean.unread_fields(config)
  why = unread.get(field) or unread.get(field.partition('.')[0])
  if why:  # before the config's own rules, which might point to another refused field
    raise UsageError(f'--set {field}: {why}')
  section, _, leaf = field.rpartition('.')
  try:
    parent = validation.lookup(config, section) if section else config
    if leaf not in parent:
      raise KeyError(field)
    if isinstance(parent[leaf], ml_collections.ConfigDict):  # would drop the fields not given
      raise UsageError(f'--set {field}: a section; set its fields one at a time '
                       f'(--set {field}.FIELD=VALUE)')
    parent[leaf] = value
  except KeyError:
    fields = list(validation.flatten(config.to_dict()))
    close = difflib.get_close_matches(field, fields, n=1)
    raise UsageError(f'--set {field}: no such config field'
                     + (f'; did you mean {close[0]}?' if close else '')) from None
  except TypeError as e:
    raise UsageError(f'--set {assignment}: {e}') from None


def build_config(args):
  """The run's config and a description of its input, from the parsed command line.

  Args:
    args: `parser().parse_args(...)`.

  Returns:
    (config, source): the ConfigDict (`defaults.paper_config()` with the options
    set) and {'model', 'model_kind', 'data', 'poisoned', 'attack'} for results.json.

  Raises:
    UsageError: a missing file or folder, options that do not go together, a
      record or .npz that cannot be read.
  """
  config = defaults.paper_config()
  model = os.path.abspath(args.model)
  if stages.is_record(model):
    kind = 'BackdoorBench record'
    try:
      record = backdoorbench.read_record(model)
    except backdoorbench.RecordError as e:
      raise UsageError(f'MODEL: {e}') from None
    config.model.name, config.model.mean, config.model.std = (record.model_name, record.mean,
                                                              record.std)
  elif os.path.isfile(model):
    kind, record = 'PyTorch file', None
  elif os.path.isdir(model):
    kind, record = 'nad-jax stage folder', None
  else:
    raise UsageError(f'MODEL {args.model} does not exist')
  config.student.checkpoint = model

  if args.tfds_dir is not None and not args.data.startswith('tfds:'):
    raise UsageError(f'--tfds-dir goes with --data tfds:NAME; ' + (
        f'--data {args.data} is a folder (drop --tfds-dir)' if os.path.isdir(args.data) else
        f'write --data tfds:{args.data} or drop --tfds-dir'))
  if args.data.startswith('tfds:'):
    config.data.source, config.data.name = 'tfds', args.data.removeprefix('tfds:')
    config.data.data_dir = args.tfds_dir
  elif os.path.isdir(args.data):
    config.data.source, config.data.path = 'folder', os.path.abspath(args.data)
  else:
    raise UsageError(f'--data {args.data}: no such folder (expected DIR/{{train,test}}/'
                     '<class>/<image>, or tfds:NAME)')

  if args.arch is not None:
    config.model.name = args.arch
  if (args.mean is None) != (args.std is None):
    raise UsageError('--mean and --std go together (both or neither)')
  if args.mean is not None:
    config.model.mean, config.model.std = numbers(args.mean, '--mean'), numbers(args.std, '--std')

  if args.poisoned and args.attack:
    raise UsageError('--poisoned and --attack exclude each other: give poisoned test images '
                     'or a built-in trigger')
  labels = None
  if args.attack:
    config.attack.name = args.attack
  elif args.poisoned or record is not None:
    poisoned = os.path.abspath(args.poisoned) if args.poisoned else model
    if not os.path.exists(poisoned):
      raise UsageError(f'--poisoned {args.poisoned} does not exist')
    config.attack.name, config.attack.path = 'files', poisoned
    labels = ((record.bd_test.labels, record.bd_test.original_labels) if not args.poisoned
              else poisoned_labels(poisoned))
  else:
    raise UsageError(f'give --poisoned PATH (poisoned test images) or --attack NAME (one of '
                     f'{", ".join(TRIGGERS)}) to measure the attack success rate; a '
                     'BackdoorBench record brings its own')
  if args.target_label is not None and args.all_to_all:
    raise UsageError(f'--target-label {args.target_label} and --all-to-all exclude each other: '
                     'an all-to-all backdoor maps y to y + 1, it has no target label')
  if args.all_to_all:
    config.attack.mode = 'all_to_all'
  elif args.target_label is not None:
    config.attack.mode, config.attack.target_label = 'all_to_one', args.target_label
  elif labels is not None:
    config.attack.mode, config.attack.target_label = label_map(
        *labels, args.poisoned or f'MODEL {args.model}')
  else:
    given = f'--attack {args.attack}' if args.attack else f'the folder --poisoned {args.poisoned}'
    raise UsageError(f'--target-label N is needed with {given}')

  if args.teacher is not None:
    if not os.path.exists(args.teacher):
      raise UsageError(f'--teacher {args.teacher} does not exist')
    config.teacher.checkpoint = os.path.abspath(args.teacher)
  defaults.defense_stages(config)  # fp and mcr, for --set; the run refuses another method's
  # The sections the options set: those the method trains (FP follows nad's schedule; MCR's
  # curve has its own recipe, its FT end keeps nad's; a given teacher is not trained).
  trained = {'nad': ('nad',) if args.teacher else ('nad', 'teacher'),
             'mcr': ('mcr',)}.get(args.method, ('nad',))
  if args.teacher_epochs is not None and 'teacher' not in trained:
    raise UsageError(f'--teacher-epochs {args.teacher_epochs}: no teacher is trained here ('
                     + ('--teacher gives it)' if args.teacher else f'--method {args.method})'))
  set_by = {}  # {field: the option that set it}
  for option, value, fields in (
      ('--clean-fraction', args.clean_fraction, ('data.clean_fraction',)),
      ('--epochs', args.epochs, (f'{trained[0]}.epochs',)),
      ('--teacher-epochs', args.teacher_epochs, ('teacher.epochs',)),
      ('--batch-size', args.batch_size, tuple(f'{s}.batch_size' for s in trained)),
      ('--lr', args.lr, tuple(f'{s}.learning_rate' for s in trained)),
      ('--eval-every', args.eval_every, tuple(f'{s}.eval_every' for s in trained)),
      ('--seed', args.seed, ('seed',))):
    if value is not None:
      for field in fields:
        section, _, leaf = field.rpartition('.')
        (config[section] if section else config)[leaf] = value
        set_by[field] = option
        if args.method == 'fp' and section == 'nad':  # FP follows nad's schedule
          set_by[f'fp.{leaf}'] = option
  for assignment in args.set:
    field = assignment.partition('=')[0].strip()
    if field in set_by:
      raise UsageError(f'--set {field}: {set_by[field]} sets it too; give one')
    set_field(config, assignment)
  source = {'model': model, 'model_kind': kind, 'data': args.data,
            'poisoned': config.attack.path if config.attack.name == 'files' else None,
            'attack': config.attack.name}
  return config, source


def main(argv: list[str] | None = None) -> None:
  """The command: parse, build the config, clean, write (nad_jax.experiments.clean.run).

  Args:
    argv: the arguments after the program name; None: sys.argv[1:].

  Raises:
    SystemExit: 1 with one `error: ...` line on stderr where the user can fix the
      cause (a bad option, file, folder, config value, or a loss that became
      non-finite); nothing is written then.
  """
  try:
    args = parser().parse_args(argv)
    if args.attention_images < 0:
      raise UsageError(f'--attention-images {args.attention_images}: must be >= 0')
    config, source = build_config(args)
    validation.validate(config)
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    if config.compilation_cache:
      jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache))
    clean.run(config, args.out, args.method, source, args.attention_images)
  except (UsageError, validation.ConfigError, FloatingPointError) as e:
    message = str(e).replace('use another --workdir', 'use another --out')
    sys.exit(f'error: {message}')


if __name__ == '__main__':
  main()
