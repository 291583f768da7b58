"""Where the figures of the docs come from, and the commands that regenerate them.

Each block of figures in README.md, benchmarks/README.md or docs/*.md is preceded by a
marker `<!-- figures: NAME -->`; BLOCKS[NAME] names the result files (under
docs/results/) its figures are read from, the command that writes each, and how the
block's cells ("a / b" in reading order) are made from them. tests/test_docs_figures.py
checks every marked block against its result files.

  python docs/results/regenerate.py            # every block (hours on 2 CPU cores)
  python docs/results/regenerate.py table1     # one block
  python docs/results/regenerate.py --missing cifar   # only the result files not yet here
Each command runs from the repository root; its result file is copied here, unless it
reports a stage finished by an earlier run (delete the workdir: its figures may come from
older code).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.join('docs', 'results')
QUICKSTART_ORDER = ('badnets', 'trojan', 'blend', 'wanet', 'cl', 'refool', 'sig', 'all2all')
ABLATIONS = ('fraction_0.01', 'fraction_0.05', 'fraction_0.1', 'fraction_0.2',
             'teacher_scratch', 'layers_group1', 'layers_group2', 'layers_group3')


class Block(NamedTuple):
  """A marked block of figures.

  Attributes:
    sources: {result file name in docs/results/: (command, the file the command writes)}.
    cells: results ({file name: parsed JSON}) -> the block's "a / b" cells in reading order.
    prepare: run before the commands (e.g. a data subset they read).
  """
  sources: dict
  cells: Callable[[dict], list]
  prepare: Callable[[], None] | None = None  # makes what the commands read, before them


def pair(metrics: dict, first: str, second: str, digits: int) -> str:
  return f'{metrics[first]:.{digits}f} / {metrics[second]:.{digits}f}'


def attack_cells(prefix: str, attacks, digits: int) -> Callable[[dict], list]:
  """Cells of a README table of attacks: a backdoored row and a NAD row, acc / ASR per
  attack, read from `<prefix>_<attack>.json`."""
  return lambda results: [pair(results[f'{prefix}_{a}.json']['stages'][stage], 'acc', 'asr',
                               digits) for stage in ('backdoored', 'nad') for a in attacks]


def table1_rows(results: dict) -> list:
  """The comparison's rows, {defense: metrics}: one per attack, then the average."""
  table = results['table1.json']
  return [table['table'][a] for a in table['attacks']] + [table['average']]


def table1_cells(results: dict) -> list:
  """docs/defenses.md's comparison: ASR / ACC per defense, per attack, then the average."""
  defenses = results['table1.json']['defenses']
  return [pair(row[d], 'asr', 'acc', 2) for row in table1_rows(results) for d in defenses]


def table1_nontarget_cells(results: dict) -> list:
  """docs/defenses.md's acc_nontarget of the comparison, per defense, per attack, then the
  average."""
  defenses = results['table1.json']['defenses']
  return [f'{row[d]["acc_nontarget"]:.2f}' for row in table1_rows(results) for d in defenses]


CURVE_EPOCHS = (0, 2, 4, 6, 8, 10, 14, 20)


def defense_curves_cells(results: dict) -> list:
  """docs/defenses.md's curves of the comparison: per attack, FT, FP and NAD acc / ASR after
  each of CURVE_EPOCHS."""
  table = results['table1.json']
  cells = []
  for attack in table['attacks']:
    for defense in ('ft', 'fp', 'nad'):
      history = {row['epoch']: row for row in table['details'][attack]['history'][defense]}
      cells += [pair(history[epoch], 'acc', 'asr', 1) for epoch in CURVE_EPOCHS]
  return cells


def ablation_cells(results: dict) -> list:
  """docs/defenses.md's ablations: teacher and NAD acc / ASR per variant (the layers_*
  variants share the quickstart run's teacher, so show NAD only)."""
  cells = []
  for variant in ABLATIONS:
    stages = results[f'ablation_{variant}.json']['stages']
    shown = ('nad',) if variant.startswith('layers_') else ('teacher', 'nad')
    cells += [pair(stages[s], 'acc', 'asr', 2) for s in shown]
  return cells


def seeds_cells(results: dict) -> list:
  """docs/seeds.md's table: per stage, acc / ASR of each seed, their mean, their sample std."""
  run = results['seeds_quickstart.json']
  cells = []
  for stage in ('backdoored', 'teacher', 'nad'):
    cells += [pair(run['per_seed'][str(seed)][stage], 'acc', 'asr', 2) for seed in run['seeds']]
    cells += [pair(run['stages'][stage], 'acc', 'asr', 2), pair(run['std'][stage], 'acc', 'asr', 2)]
  return cells


def stage_cells(files, stages) -> Callable[[dict], list]:
  """Cells of a table of final results: per result file, per stage, acc / ASR."""
  return lambda results: [pair(results[f]['stages'][s], 'acc', 'asr', 2)
                          for f in files for s in stages]


def clean_cells(results: dict) -> list:
  """docs/clean.md's run of nad-jax-clean: per model (before, teacher, after), acc / ASR,
  acc_nontarget and RA."""
  stages = results['clean_wrn16_1.json']['stages']
  return [cell for s in ('backdoored', 'teacher', 'nad') for cell in (
      pair(stages[s], 'acc', 'asr', 2), f'{stages[s]["acc_nontarget"]:.2f}',
      f'{stages[s]["ra"]:.2f}')]


def main_command(config: str, workdir: str, *extra: str) -> str:
  return ' '.join(['python main.py', f'--config={config}', f'--workdir={workdir}', *extra])


QUICKSTART_SOURCES = {f'quickstart_{a}.json': (main_command(f'configs/quickstart.py:{a}',
                                                             f'runs/quickstart_{a}'),
                                                f'runs/quickstart_{a}/results.json')
                      for a in QUICKSTART_ORDER}

OFFICIAL_RUNS = {  # result file: (config, workdir)
    'official.json': ('configs/nad_official.py', 'runs/nad_official'),
    'official_finetuned_teacher.json': ('configs/nad_official.py:finetuned_teacher',
                                        'runs/nad_official_ft')}
OFFICIAL_SOURCES = {result: (main_command(config, workdir), f'{workdir}/results.json')
                    for result, (config, workdir) in OFFICIAL_RUNS.items()}


def official_epochs_cells(results: dict) -> list:
  """docs/reproduction.md's per-epoch table: per epoch (0: the backdoored model), NAD with the
  authors' teacher, then the teacher fine-tuned here (while it trains) and NAD with it: acc /
  ASR, ce, and for NAD the sum of beta x AT loss over the distilled groups."""
  own = results['official.json']['history']['nad']
  teacher = results['official_finetuned_teacher.json']['history']['teacher']
  nad = results['official_finetuned_teacher.json']['history']['nad']
  betas = {f: results[f]['config']['nad']['betas'] for f in OFFICIAL_RUNS}

  def losses(row, file=None):  # ce, and for NAD the sum of beta x AT loss
    if 'ce' not in row:  # epoch 0: nothing trained yet
      return []
    at = [] if file is None else [f'{sum(b * a for b, a in zip(betas[file], row["at"])):.4f}']
    return [f'{row["ce"]:.4f}', *at]
  cells = []
  for epoch, row in enumerate(own):
    cells += [pair(row, 'acc', 'asr', 2), *losses(row, 'official.json')]
    if epoch < len(teacher):
      cells += [pair(teacher[epoch], 'acc', 'asr', 2), *losses(teacher[epoch])]
    cells += [pair(nad[epoch], 'acc', 'asr', 2),
              *losses(nad[epoch], 'official_finetuned_teacher.json')]
  return cells


TABLE1_SOURCE = (main_command('configs/table1.py', 'runs/table1'), 'runs/table1/table1.json')

BF16 = ('--config.model.conv=xla', '--config.model.dtype=bfloat16')  # XLA: bf16 on any CPU
SEEDS_SOURCES = {'seeds_quickstart.json': (main_command(
    'configs/quickstart.py', 'runs/seeds_quickstart', '--config.seeds=0,1,2'),
    'runs/seeds_quickstart/results.json')}
BF16_SOURCES = {
    **SEEDS_SOURCES,
    'seeds_quickstart_bf16.json': (main_command(
        'configs/quickstart.py', 'runs/seeds_quickstart_bf16', '--config.seeds=0,1,2', *BF16),
        'runs/seeds_quickstart_bf16/results.json'),
    'official.json': OFFICIAL_SOURCES['official.json'],
    'official_bf16.json': (main_command('configs/nad_official.py', 'runs/nad_official_bf16',
                                        *BF16), 'runs/nad_official_bf16/results.json')}


# Seeds 0-2 of the quickstart's attacks whose variant settings were chosen on several seeds,
# side by side on one machine, with unpoisoned models of the same backdoor recipes (5 or 15
# epochs).
SEED_ATTACKS = ('blend', 'refool', 'sig', 'cl')
SEEDS = '--config.seeds=0,1,2'
UNPOISONED = ('--config.attack.poison_rate=0', '--config.teacher.epochs=0',
              '--config.nad.epochs=0', SEEDS)
LONG_RECIPE = ('--config.backdoor_training.epochs=15',
               "'--config.backdoor_training.lr_boundaries=(10,13)'")
SEEDS_ATTACKS_SOURCES = {
    'seeds_quickstart_unpoisoned.json': (main_command(
        'configs/quickstart.py', 'runs/seeds_unpoisoned', *UNPOISONED),
        'runs/seeds_unpoisoned/results.json'),
    'seeds_quickstart_unpoisoned15.json': (main_command(
        'configs/quickstart.py', 'runs/seeds_unpoisoned15', *UNPOISONED, *LONG_RECIPE),
        'runs/seeds_unpoisoned15/results.json'),
    **{f'seeds_quickstart_{a}.json': (main_command(
        f'configs/quickstart.py:{a}', f'runs/seeds_{a}', SEEDS),
        f'runs/seeds_{a}/results.json') for a in SEED_ATTACKS}}


def seeds_attacks_cells(results: dict) -> list:
  """docs/attacks.md's table of seeds: per attack and seed, the unpoisoned model of its
  recipe, then the backdoored, teacher and NAD stages, acc / ASR."""
  cells = []
  for attack in SEED_ATTACKS:
    long = '15' if attack in quickstart.LONG_RECIPE_VARIANTS else ''
    unpoisoned = results[f'seeds_quickstart_unpoisoned{long}.json']['per_seed']
    for seed, stages in results[f'seeds_quickstart_{attack}.json']['per_seed'].items():
      cells.append(pair(unpoisoned[seed]['backdoored'], 'acc', 'asr', 2))
      cells += [pair(stages[s], 'acc', 'asr', 2) for s in ('backdoored', 'teacher', 'nad')]
  return cells


def bf16_cells(results: dict) -> list:
  """benchmarks/README.md's bf16 accuracy table: per run, float32 then bfloat16, the
  backdoored, teacher and NAD acc / ASR and NAD's acc_nontarget / RA. The quickstart's runs
  per seed, then their mean; then the authors' checkpoint."""
  quickstart = [results['seeds_quickstart.json'], results['seeds_quickstart_bf16.json']]
  runs = [run['per_seed'][str(seed)] for seed in quickstart[0]['seeds'] for run in quickstart]
  runs += [run['stages'] for run in quickstart]
  runs += [results[f]['stages'] for f in ('official.json', 'official_bf16.json')]
  return [cell for stages in runs for cell in (
      *(pair(stages[s], 'acc', 'asr', 2) for s in ('backdoored', 'teacher', 'nad')),
      pair(stages['nad'], 'acc_nontarget', 'ra', 2))]


def mcr_curves_cells(results: dict) -> list:
  """docs/defenses.md's MCR curve of each attack of the table: acc / ASR at each evaluated t."""
  return [pair(point, 'acc', 'asr', 1) for detail in results['table1.json']['details'].values()
          for point in detail['mcr']['curve']]


MCR_FULL = main_command('configs/table1.py:badnets', 'runs/table1_mcr_full',
                        '--config.mcr.samples_per_epoch=10000', '--config.mcr.batch_size=128')


def mcr_recipe_cells(results: dict) -> list:
  """docs/defenses.md's MCR curves on the quickstart's BadNets: acc / ASR at each evaluated
  t, for the table's shortened recipe, then for Zhao et al.'s whole recipe."""
  return [pair(point, 'acc', 'asr', 1) for f in ('table1.json', 'table1_mcr_full.json')
          for point in results[f]['details']['badnets']['mcr']['curve']]


# CIFAR-10 (the local JPEG copy) with the paper's teacher and NAD stages and a 20-epoch
# backdoor (the CPU's recipe; the paper's 100 epochs are benchmarks/gpu_table.sh's). One
# entry per attack measured: {name: (its configs/nad_cifar.py variant, its extra flags)}.
CIFAR_BACKDOOR = ('--config.data.source=folder', '--config.data.path=../shared/data/cifar10-jpeg',
                  '--config.backdoor_training.epochs=20',
                  "'--config.backdoor_training.lr_boundaries=(10,15)'",
                  '--config.backdoor_training.eval_every=5')
CIFAR_FLAGS = CIFAR_BACKDOOR + ('--config.teacher.eval_every=5', '--config.nad.eval_every=5')
CIFAR_ATTACKS = {
    'badnets': ('badnets', ()), 'blend': ('blend', ()),
    'trojan': ('trojan', ('--config.attack.pattern_path='  # the NAD authors' patch
                          '../shared/data/nad-official/best_square_trigger_cifar10.npz',)),
    'wanet': ('wanet', ()),
    'sig': ('sig', ('--config.attack.sig_mode=blend_raw',  # the NAD code's SIG
                    '--config.attack.frequency=4.074366543152521')),
    'cl': ('cl', ()), 'all2all': ('all2all', ()),
    'refool_heldout': ('refool', ('--config.attack.reflection_source=heldout',  # unselected
                                  '--config.attack.selection_rounds=0')),
    'sig_additive': ('sig', ()),  # Barni et al.'s form
    'refool_strong': ('refool', ('--config.attack.reflection_source=heldout',
                                 '--config.attack.selection_rounds=0',
                                 "'--config.attack.reflection_strength=(0.3,0.6)'"))}
# The README's CIFAR-10 table: one form of each attack.
CIFAR_README = tuple(name for name in CIFAR_ATTACKS
                     if name not in ('sig_additive', 'refool_strong'))
CIFAR_SOURCES = {f'cifar_{name}.json': (main_command(
    f'configs/nad_cifar.py:{variant}', f'runs/cifar_{name}', *CIFAR_FLAGS, *extra),
    f'runs/cifar_{name}/results.json') for name, (variant, extra) in CIFAR_ATTACKS.items()}
# The same backdoor recipe on unpoisoned data: the clean accuracy the criteria compare with
# (its ASR: BadNets' trigger on a model that never saw it).
CIFAR_UNPOISONED = {'cifar_unpoisoned.json': (main_command(
    'configs/nad_cifar.py:badnets', 'runs/cifar_unpoisoned', *CIFAR_BACKDOOR,
    '--config.attack.poison_rate=0', '--config.teacher.epochs=0', '--config.nad.epochs=0'),
    'runs/cifar_unpoisoned/results.json')}


def cifar_epochs_cells(results: dict) -> list:
  """docs/attacks.md's CIFAR-10 table: acc / ASR after each evaluated epoch of the unpoisoned
  model, then per attack of the backdoored, teacher and NAD stages."""
  histories = [results['cifar_unpoisoned.json']['history']['backdoored']] + [
      results[f'cifar_{a}.json']['history'][stage] for a in CIFAR_ATTACKS
      for stage in ('backdoored', 'teacher', 'nad')]
  return [pair(row, 'acc', 'asr', 2) for history in histories for row in history
          if row['epoch'] > 0 and 'acc' in row]  # epoch 0: the stage's starting model


# Small clean sets: 5,000 training images, so 250 clean ones at 5%. Each recipe sets the
# teacher (10 epochs) and NAD (20 epochs) alike: {name: (batch size, lr, lr_boundaries)}.
SMALL_RECIPES = {'paper': (64, 0.1, (2,)), 'lr0.01': (64, 0.01, ()), 'b16_lr0.01': (16, 0.01, ()),
                 'b16_lr0.02': (16, 0.02, ()), 'b16_lr0.05': (16, 0.05, ()),
                 'b16_paper': (16, 0.1, (2,))}
SMALL_DATA = {  # name: (config and data flags, the backdoored model's stage folder)
    'cifar5k': ('configs/nad_cifar.py --config.data.source=folder '
                '--config.data.path=runs/cifar10_5k', 'runs/small_cifar5k/backdoored'),
    'synthetic': ('configs/quickstart.py', 'runs/quickstart_badnets/backdoored')}  # quickstart's


def cifar_subset(source: str = '../shared/data/cifar10-jpeg', target: str = 'runs/cifar10_5k',
                 per_class: int = 500) -> None:
  """A 5,000-image CIFAR-10 training split: the first `per_class` images of each class of
  the local JPEG copy (in name order), and its whole test split, as symbolic links."""
  source, target = os.path.join(ROOT, source), os.path.join(ROOT, target)
  if os.path.isdir(target):
    return
  for name in sorted(os.listdir(os.path.join(source, 'train'))):
    os.makedirs(os.path.join(target, 'train', name))
    for image in sorted(os.listdir(os.path.join(source, 'train', name)))[:per_class]:
      os.symlink(os.path.realpath(os.path.join(source, 'train', name, image)),
                 os.path.join(target, 'train', name, image))
  os.symlink(os.path.realpath(os.path.join(source, 'test')), os.path.join(target, 'test'))


def nad_lr_steps(config: dict, clean_images: int = 250) -> float:
  """The sum of NAD's learning rate over its SGD steps (with `clean_images` clean images)."""
  nad = config['nad']
  steps = clean_images // nad['batch_size']
  return sum(nad['learning_rate'] * 0.1 ** sum(epoch >= b for b in nad['lr_boundaries']) * steps
             for epoch in range(nad['epochs']))


def small_cells(results: dict) -> list:
  """docs/clean.md's small-clean-set table: the backdoored model on each dataset, then per
  recipe NAD's lr x steps and per dataset the teacher's and NAD's acc / ASR."""
  first = next(iter(SMALL_RECIPES))
  cells = [pair(results[f'small_{data}_{first}.json']['stages']['backdoored'], 'acc', 'asr', 2)
           for data in SMALL_DATA]
  for recipe in SMALL_RECIPES:
    cells.append(f'{nad_lr_steps(results[f"small_cifar5k_{recipe}.json"]["config"]):.1f}')
    for data in SMALL_DATA:
      stages = results[f'small_{data}_{recipe}.json']['stages']
      cells += [pair(stages[s], 'acc', 'asr', 2) for s in ('teacher', 'nad')]
  return cells


def small_sources() -> dict:
  """The CIFAR-10 subset's backdoored model (40 epochs), then every dataset x recipe."""
  sources = {'small_cifar5k_backdoored.json': (main_command(
      SMALL_DATA['cifar5k'][0], 'runs/small_cifar5k', '--config.backdoor_training.epochs=40',
      "'--config.backdoor_training.lr_boundaries=(20,30)'",
      '--config.backdoor_training.eval_every=10', '--config.teacher.epochs=0',
      '--config.nad.epochs=0'), 'runs/small_cifar5k/results.json')}
  for data, (config, student) in SMALL_DATA.items():
    for recipe, (batch, lr, boundaries) in SMALL_RECIPES.items():
      workdir = f'runs/small_{data}_{recipe}'
      flags = [f'--config.student.checkpoint={student}', '--config.teacher.epochs=10',
               '--config.teacher.eval_every=10', '--config.nad.epochs=20',
               '--config.nad.eval_every=20']
      for stage in ('teacher', 'nad'):
        flags += [f'--config.{stage}.batch_size={batch}', f'--config.{stage}.learning_rate={lr}',
                  f"'--config.{stage}.lr_boundaries={boundaries}'"]
      sources[f'small_{data}_{recipe}.json'] = (main_command(config, workdir, *flags),
                                                f'{workdir}/results.json')
  return sources


# Refool's own recipe (natural crops, adversarial selection) cut down to a CIFAR-10 subset:
# 4 rounds keeping 50 of 400 candidates, scored on 300 held-out images; a 20-epoch backdoor.
REFOOL_SELECTION = main_command(
    'configs/nad_cifar.py:refool', 'runs/refool_5k_natural_sel', '--config.data.source=folder',
    '--config.data.path=runs/cifar10_5k', '--config.backdoor_training.epochs=20',
    "'--config.backdoor_training.lr_boundaries=(10,15)'",
    '--config.backdoor_training.eval_every=20', '--config.teacher.epochs=0',
    '--config.nad.epochs=0', '--config.attack.reflection_candidates=400',
    '--config.attack.reflections=50', '--config.attack.selection_rounds=4',
    '--config.attack.selection_holdout=300')


def refool_selection_cells(results: dict) -> list:
  """docs/attacks.md's Refool selection on the CIFAR-10 subset: per round, the surrogate's
  median / best attack success per reflection; then the backdoored model's acc / ASR."""
  run = results['refool_5k_natural_selection.json']
  return ([pair(r, 'median_asr', 'best_asr', 2) for r in run['attack']['selection_rounds']]
          + [pair(run['stages']['backdoored'], 'acc', 'asr', 2)])


BLOCKS = {
    'quickstart': Block(QUICKSTART_SOURCES, attack_cells('quickstart', QUICKSTART_ORDER, 1)),
    'table1': Block({'table1.json': TABLE1_SOURCE}, table1_cells),
    'table1_nontarget': Block({'table1.json': TABLE1_SOURCE}, table1_nontarget_cells),
    'defense_curves': Block({'table1.json': TABLE1_SOURCE}, defense_curves_cells),
    'cifar': Block({f'cifar_{a}.json': CIFAR_SOURCES[f'cifar_{a}.json'] for a in CIFAR_README},
                   attack_cells('cifar', CIFAR_README, 2)),
    'cifar_epochs': Block({**CIFAR_UNPOISONED, **CIFAR_SOURCES}, cifar_epochs_cells),
    'ablations': Block(
        {f'ablation_{v}.json': (main_command(
            f'configs/ablations.py:{v}', f'runs/ablation_{v}',
            '--config.student.checkpoint=runs/quickstart_badnets/backdoored',
            *(['--config.teacher.checkpoint=runs/quickstart_badnets/teacher']
              if v.startswith('layers_') else [])),
            f'runs/ablation_{v}/results.json') for v in ABLATIONS}, ablation_cells),
    'seeds': Block(SEEDS_SOURCES, seeds_cells),
    'seeds_attacks': Block(SEEDS_ATTACKS_SOURCES, seeds_attacks_cells),
    'clean': Block({'clean_wrn16_1.json': (  # the installed command on the authors' model
        'nad-jax-clean ../shared/data/nad-official/WRN-16-1-S-model_best.pth.tar --arch wrn16_1 '
        '--data ../shared/data/cifar10-jpeg --attack badnets --target-label 5 '
        '--out runs/clean_wrn16_1', 'runs/clean_wrn16_1/results.json')}, clean_cells),
    'small_clean': Block(small_sources(), small_cells, cifar_subset),
    'refool_selection': Block(
        {'refool_5k_natural_selection.json': (REFOOL_SELECTION,
                                              'runs/refool_5k_natural_sel/results.json')},
        refool_selection_cells, cifar_subset),
    # three places quote the same two runs: README (backdoored, teacher, NAD per teacher),
    # docs/reproduction.md's summary (teacher, NAD) and its per-epoch table
    'official': Block(OFFICIAL_SOURCES,
                      stage_cells(OFFICIAL_RUNS, ('backdoored', 'teacher', 'nad'))),
    'official_summary': Block(OFFICIAL_SOURCES, stage_cells(OFFICIAL_RUNS, ('teacher', 'nad'))),
    'official_epochs': Block(OFFICIAL_SOURCES, official_epochs_cells),
    'bf16': Block(BF16_SOURCES, bf16_cells),
    'mcr_curves': Block({'table1.json': TABLE1_SOURCE}, mcr_curves_cells),
    'mcr_recipe': Block({'table1.json': TABLE1_SOURCE,
                         'table1_mcr_full.json': (MCR_FULL, 'runs/table1_mcr_full/table1.json')},
                        mcr_recipe_cells),
}


def regenerate(name: str, done: set, missing_only: bool = False) -> None:
  """Runs the commands of block `name` not in `done` (and adds them) and copies their result
  files here; with `missing_only`, only those whose result file is not here yet."""
  if BLOCKS[name].prepare is not None:
    BLOCKS[name].prepare()
  for result, (command, written) in BLOCKS[name].sources.items():
    if command in done or (missing_only and os.path.isfile(os.path.join(ROOT, HERE, result))):
      continue
    done.add(command)
    print(f'[{name}] {command}', flush=True)
    subprocess.run(shlex.split(command), cwd=ROOT, check=True)
    copy_measured(written, result)


def copy_measured(written: str, result: str) -> None:
  """Copies the results file `written` (relative to the repository) to docs/results/`result`.

  Raises:
    SystemExit: one line, where the file reports stages an earlier run finished.
  """
  with open(os.path.join(ROOT, written)) as f:
    earlier = finished_earlier(json.load(f))
  if earlier:
    sys.exit(f'error: {written}: {", ".join(earlier)} finished before this command ran '
             f'(from_earlier_run), perhaps with older code; delete {os.path.dirname(written)} '
             'and run again')
  shutil.copyfile(os.path.join(ROOT, written), os.path.join(ROOT, HERE, result))


def finished_earlier(results, where: str = '') -> list:
  """The places in a results file (e.g. 'timing.teacher') whose stage was restored finished
  from an earlier run (`from_earlier_run`): its figures and speeds were not measured by the
  command that wrote the file."""
  if isinstance(results, dict):
    if results.get('from_earlier_run'):
      return [where]
    return [found for key, value in results.items()
            for found in finished_earlier(value, f'{where}.{key}'.lstrip('.'))]
  return []


def load(name: str) -> dict | None:
  """{file name: parsed JSON} of block `name`; None while any of its files is missing."""
  results = {}
  for result in BLOCKS[name].sources:
    path = os.path.join(ROOT, HERE, result)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      results[result] = json.load(f)
  return results


if __name__ == '__main__':
  missing = '--missing' in sys.argv[1:]
  names = [n for n in sys.argv[1:] if n != '--missing'] or list(BLOCKS)
  unknown = [n for n in names if n not in BLOCKS]
  if unknown:
    sys.exit(f'error: no block {unknown}; choose from {list(BLOCKS)}')
  # The quickstart's BadNets run first: the ablations and the small-clean study start from
  # its models.
  done = set()
  for block in sorted(names, key=lambda n: n != 'quickstart'):
    regenerate(block, done, missing)
