"""The comparison of the paper's Table 1: attacks x {no defense, FT, FP, MCR, NAD}.

For each attack of `config.table.attacks` (its settings: `config.table.attack_configs`)
one backdoored model is trained (or loaded) in `workdir/<attack>/backdoored`,
and every defense of `config.table.defenses` starts from it, each a stage in
`workdir/<attack>/<stage>` (ft, fp, mcr, teacher, nad): rerunning skips what is
done and resumes what is not. Writes `workdir/table1.{md,csv,json}` (ACC,
ACC on non-target images, ASR per cell, and the average over attacks) and the
figures in `workdir/figures/`. `config.eval_only` restores every stage a run wrote and
evaluates it (`evaluate_only`).

With `config.seeds` (e.g. (0, 1, 2)) the whole table runs once per seed, one seed after
another, in `workdir/seed_<S>` exactly as `--config.seed=S --workdir=workdir/seed_<S>`
runs it (so seeds may also run as separate processes, and this command then gathers
them), and `workdir/table1.{md,csv,json}` give each cell's mean and sample standard
deviation over the seeds. Fine-pruning removes other channels in each seed, so the
seeds are not stacked as replicas of one network, as the NAD pipeline stacks them.
"""

import copy
import csv
import io
import os
import shlex
import time

import jax
import numpy as np

from nad_jax import defaults
from nad_jax import figures
from nad_jax import stages
from nad_jax import validation
from nad_jax.defenses import NAMES
from nad_jax.defenses import fine_pruning
from nad_jax.defenses import finetune
from nad_jax.defenses import mcr
from nad_jax.defenses import nad as nad_lib

METRICS = stages.METRICS


def attack_config(config, attack: str):
  """The config that runs `attack`'s rows (configs/table1.py describes the layout).

  Args:
    config: the table's config.
    attack: a key of `config.table.attack_configs`.

  Returns:
    A copy of `config` with the fields of `config.table.attack_configs.<attack>` laid
    over its sections, references resolved. They are laid over before the references
    are resolved, so FP, which follows NAD's schedule, follows the attack's.

  Raises:
    ConfigError: a per-attack field that the top-level sections lack.
  """
  cfg = copy.deepcopy(config)  # a deep copy keeps fp's and mcr's references to nad
  lay_over(cfg, cfg.table.attack_configs[attack].to_dict(), f'table.attack_configs.{attack}')
  return cfg.copy_and_resolve_references()


def lay_over(section, fields, name: str) -> None:
  """Sets every leaf of `fields` (a nested dict) in `section`, in place."""
  for key, value in fields.items():
    if key not in section:
      raise validation.ConfigError(f'{name}.{key}: the config has no such field to set')
    if isinstance(value, dict):
      lay_over(section[key], value, f'{name}.{key}')
    else:
      section[key] = value


def shadowing_attacks(config, field: str) -> list[str]:
  """The attacks of the table that set `field` (dotted) themselves."""
  out = []
  for attack in config.table.attacks:
    try:
      validation.lookup(config.table.attack_configs[attack], field)
      out.append(attack)
    except KeyError:
      continue
  return out


def unread_by_defenses(config) -> dict:
  """{section or field: why} of `config` that no defense of `config.table.defenses` reads:
  fp's and mcr's sections without them, NAD's teacher and distillation without NAD, and
  NAD's schedule, which FT and MCR's FT end train with, without them (FP alone reads the
  fields of it that its own follow, `defaults.fp_follows`)."""
  defenses = tuple(config.table.defenses)
  why = lambda name: f'table.defenses {defenses} has no {name}'
  unread = {section: why(section) for section in ('fp', 'mcr') if section not in defenses}
  if 'nad' not in defenses and not {'ft', 'mcr'} & set(defenses):
    if 'fp' in defenses:
      followed = defaults.fp_follows(config)
      unread.update({f'nad.{field}': f'table.defenses {defenses}: FP, its one defense that '
                     'trains, does not read it (its fp.* fields follow only '
                     f"{', '.join(followed) or 'none'} of nad's)"
                     for field in config.nad if field not in followed})
    else:
      unread['nad'] = why('defense that trains')
  if 'nad' not in defenses:
    unread.update({name: why('nad') for name in ('teacher', 'nad.betas', 'nad.p', 'nad.layers')})
  return unread


def check_overrides(config, fields) -> None:
  """Refuses a command-line override that would not reach every attack of the table.

  Args:
    config: the table's config, overrides applied.
    fields: the dotted fields the command line set (`--config.<field>=...`).

  Raises:
    ConfigError: a top-level field that an attack of the table sets itself, naming
      the per-attack fields to set instead; a field (top-level or an attack's own) of a
      defense the table does not run (`unread_by_defenses`), of an attack it does not run,
      or one the run does not read (validation.unread_fields).
  """
  unread = unread_by_defenses(config)
  absent = {f'table.attack_configs.{attack}': f'table.attacks {tuple(config.table.attacks)} '
            f'has no {attack}' for attack in config.table.attack_configs
            if attack not in config.table.attacks}
  validation.refuse_overrides(config, fields,
                              {**unread, **absent, **validation.unread_fields(config)})
  for attack in config.table.attacks:  # an attack's own fields, with its own mode
    prefix = f'table.attack_configs.{attack}.'
    cfg = attack_config(config, attack)
    validation.refuse_overrides(cfg, [f.removeprefix(prefix) for f in fields
                                      if f.startswith(prefix)],
                                {**unread, **validation.unread_fields(cfg)}, prefix)
  for field in fields:
    attacks = shadowing_attacks(config, field)
    if attacks:
      value = validation.lookup(config, field)
      raise validation.ConfigError(
          f'{field} {value!r}: set per attack by {", ".join(attacks)} '
          f'(table.attack_configs.<attack>.{field}), so a top-level value would not reach '
          f'{"them" if len(attacks) > 1 else "it"}; set it per attack: ' + ' '.join(
              shlex.quote(f'--config.table.attack_configs.{a}.{field}={value!r}')
              for a in attacks))


def clock():
  """(wall, CPU) seconds now, for `since`."""
  return time.perf_counter(), time.process_time()


def since(start) -> dict:
  """{'wall_s', 'cpu_s'} elapsed since `start` (a `clock()`)."""
  wall, cpu = clock()
  return {'wall_s': round(wall - start[0], 1), 'cpu_s': round(cpu - start[1], 1)}


def run_attack(ctx: stages.Context, defenses) -> dict:
  """Every defense against one attack; returns {'metrics', 'history', 'timing', ...}."""
  out = {'metrics': {}, 'history': {}, 'timing': {}, 'stage_timing': {},
         **({'attack': ctx.attack.info} if ctx.attack.info else {})}

  def record(key, result: stages.StageResult, metrics: dict | None = None):
    out['history'][key] = result.history
    out['stage_timing'][key] = result.timing
    if metrics is not None:
      out['metrics'][key] = {k: metrics[k] for k in METRICS}
    return result.variables

  clean = stages.clean_data(ctx)
  start = clock()
  backdoored = stages.backdoored(ctx)
  student = record('none', backdoored, backdoored.metrics)
  out['timing']['backdoored'] = since(start)
  ft = None
  if 'ft' in defenses or 'mcr' in defenses:
    start = clock()
    ft = finetune.finetune(ctx, student, clean, student_metrics=backdoored.metrics)
    record('ft', ft, ft.metrics if 'ft' in defenses else None)
    out['timing']['ft'] = since(start)
  if 'fp' in defenses:
    start = clock()
    result = fine_pruning.fine_prune(ctx, student, clean)
    record('fp', result, result.metrics)
    out['fine_pruning'] = result.info
    out['timing']['fp'] = since(start)
  if 'mcr' in defenses:
    start = clock()
    result = mcr.erase(ctx, student, clean, ft)
    at_t = next(c for c in result.info['curve'] if c['t'] == result.info['t'])
    record('mcr', result, at_t)
    out['mcr'] = result.info
    out['timing']['mcr'] = since(start)
  if 'nad' in defenses:
    start = clock()
    result = nad_lib.erase(ctx, student, clean, backdoored.metrics)
    teacher = record('teacher', result.info['teacher'])
    nad = record('nad', result, result.metrics)
    out['timing']['nad'] = since(start)
    out['models'] = {'backdoored': student, 'teacher': teacher, 'NAD': nad}
  return out


# The stages behind each wall-clock entry of an attack's 'timing' (its 'stage_timing' keys).
TIMED_STAGES = {'backdoored': ('none',), 'ft': ('ft',), 'fp': ('fp',), 'mcr': ('mcr',),
                'nad': ('teacher', 'nad')}


def kept_attack_timing(earlier: dict, detail: dict) -> dict:
  """One attack's `run_attack` output keeping what an earlier run measured: each stage that
  trained nothing now keeps `earlier`'s (that attack's entry of the table file) stage
  timing, each defense whose stages all did keeps its wall-clock timing, and the attack's
  total is kept where every defense was; each kept entry is marked `from_earlier_run`.
  Where nothing trained but the earlier run timed other defenses, the total is this run's,
  marked `trained_nothing`. A kept stage that ran with other evaluation values says so
  (stages.trained_with)."""
  stage_timing = stages.trained_with(
      stages.kept_timing(earlier.get('stage_timing') or {}, detail['stage_timing']),
      detail['config'], earlier.get('config'))
  old = earlier.get('timing') or {}
  timing = {}
  for key, now in detail['timing'].items():
    behind = [stage_timing[s] for s in TIMED_STAGES.get(key, ()) if s in stage_timing]
    kept = key in old and bool(behind) and all(t.get('from_earlier_run') for t in behind)
    timing[key] = {**old[key], 'from_earlier_run': True} if kept else now
  if all(t.get('from_earlier_run') for k, t in timing.items() if k != 'total'):
    # nothing trained: the earlier total where it timed the same defenses, else this run's,
    # which only restored and evaluated
    timing['total'] = ({**old['total'], 'from_earlier_run': True} if set(old) == set(timing)
                       else {**timing['total'], 'trained_nothing': True})
  return {**detail, 'timing': timing, 'stage_timing': stage_timing}


def kept_timing(path: str, results: dict, details: list | None = None) -> dict:
  """A table file's content (`results`) keeping what the file at `path` recorded where
  this run trained nothing: each attack's as `kept_attack_timing`, and the table's total
  'timing' where every attack (of `results['details']`, or `details`: every
  seed's) was kept whole, for the same attacks, defenses and seeds; where nothing trained
  but the table differs, this run's total, marked `trained_nothing`."""
  earlier = stages.earlier_results(path)
  if 'details' in results:
    results = {**results, 'details': {
        attack: kept_attack_timing(earlier.get('details', {}).get(attack) or {}, detail)
        for attack, detail in results['details'].items()}}
    details = list(results['details'].values())
  same_table = all(earlier.get(k) == results.get(k) for k in ('attacks', 'defenses', 'seeds'))
  totals = [d['timing'].get('total', {}) for d in details]
  if all(t.get('from_earlier_run') or t.get('trained_nothing') for t in totals):
    kept = 'timing' in earlier and same_table and all(t.get('from_earlier_run') for t in totals)
    results = {**results, 'timing': {**earlier['timing'], 'from_earlier_run': True} if kept
               else {**results['timing'], 'trained_nothing': True}}
  return results


def trained_now(details) -> bool:
  """Whether any stage of the attacks' `run_attack` outputs (`details`) trained in this run."""
  return stages.trained_now(t for d in details for t in d['stage_timing'].values())


def average(cells: dict, defenses) -> dict:
  """{defense: METRICS averaged over the attacks} of {attack: {defense: metrics}}."""
  return {d: {k: round(float(np.mean([cells[a][d][k] for a in cells])), 2) for k in METRICS}
          for d in defenses}


def markdown(cells: dict, avg: dict, defenses, std: dict | None = None) -> str:
  """table1.md: a row per attack and the average; ASR and ACC per defense.

  Args:
    cells: {attack: {defense: METRICS}}, in percent.
    avg: {defense: METRICS}, the average over attacks.
    defenses: the column order.
    std: `over_seeds`'s 'std' ({attack or 'average': {defense: METRICS}}); each cell
      then reads 'mean ± std'.
  """
  rows = {**cells, 'average': avg}
  def cell(name, d, k):
    spread = std[name][d][k] if std else None
    return f'{rows[name][d][k]:.2f}' + ('' if spread is None else f' ± {spread:.2f}')

  head = '| Attack | ' + ' | '.join(f'{NAMES[d]} ASR | {NAMES[d]} ACC' for d in defenses) + ' |'
  lines = [head, '|' + '---|' * (1 + 2 * len(defenses))]
  for name in rows:
    label = '**Average**' if name == 'average' else name
    lines.append(f'| {label} | ' + ' | '.join(f'{cell(name, d, "asr")} | {cell(name, d, "acc")}'
                                           for d in defenses) + ' |')
  return '\n'.join(lines) + '\n'


def csv_text(cells: dict, avg: dict, defenses, std: dict | None = None) -> str:
  """table1.csv: attack, defense and the METRICS, one row a cell; with `std` (as for
  `markdown`) a `<metric>_std` column follows each metric (empty for one seed)."""
  rows = {**cells, 'average': avg}
  columns = [c for k in METRICS for c in ([k, f'{k}_std'] if std else [k])]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['attack', 'defense', *columns])
  for name in rows:
    for d in defenses:
      values = {k: f'{rows[name][d][k]:.2f}' for k in METRICS}
      if std:
        values.update({f'{k}_std': '' if std[name][d][k] is None else f'{std[name][d][k]:.2f}'
                       for k in METRICS})
      writer.writerow([name, d, *(values[c] for c in columns)])
  return buffer.getvalue()


def write_tables(workdir: str, cells: dict, avg: dict, defenses, std: dict | None = None):
  """Writes table1.md and table1.csv in `workdir` (process 0) and logs the table."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'table1.md'), 'w') as f:
      f.write(markdown(cells, avg, defenses, std))
    with open(os.path.join(workdir, 'table1.csv'), 'w') as f:
      f.write(csv_text(cells, avg, defenses, std))
  stages.log(markdown(cells, avg, defenses, std))


def write_figures(figure_dir: str, ctx, attack: str, out: dict, config) -> list:
  """One attack's figures in `figure_dir`: the defenses' per-epoch curves and, where NAD ran,
  the attention maps of triggered test images; returns their paths."""
  os.makedirs(figure_dir, exist_ok=True)
  paths = []
  curves = {NAMES[d]: out['history'][d] for d in ('ft', 'fp', 'mcr', 'nad')
            if d in out['history'] and d in out['metrics']}
  if curves:
    path = os.path.join(figure_dir, f'{attack}_defense_curves.png')
    figures.defense_curves(path, curves, f'{attack}: defenses per epoch (MCR at t={config.mcr.t})')
    paths.append(path)
  if 'models' in out and config.table.attention_images:
    ds = ctx.dataset
    images, _, _ = figures.triggered_examples(ctx.attack, ds.test_images, ds.test_labels,
                                              config.table.attention_images, config.seed)
    path = os.path.join(figure_dir, f'{attack}_attention.png')
    figures.attention(path, ctx.model, out['models'], images, ctx.normalize,
                      validation.distill_layers(config), config.nad.p,
                      f'{attack}: attention maps of triggered test images')
    paths.append(path)
  return paths


FOLDERS = ('backdoored', 'teacher', 'nad', 'ft', 'fp', 'mcr')  # the stage folders of an attack


def folders_of(defenses) -> list[str]:
  """The stage folders (FOLDERS) an attack's row of `defenses` trains and evaluates; the
  others' folders, left by another table in the same workdir, are not checked."""
  needed = {'backdoored'} | set(defenses)
  needed |= {'ft'} if 'mcr' in defenses else set()  # the curve's end
  needed |= {'teacher'} if 'nad' in defenses else set()
  return [name for name in FOLDERS if name in needed]


def attack_configs(config, workdir: str, evaluating: bool = False) -> dict:
  """{attack: the config that runs its rows}, each validated and checked against the
  stage folders of `workdir/<attack>` (as validation.check_workdir, `evaluating` passed
  on), before anything trains or is evaluated. A top-level attack field that only some
  attacks read reaches those; the others keep the paper's default (they read no such field).

  Raises:
    ConfigError: naming the field (of the table or of one attack's config) or the folder.
  """
  validation.validate(config)
  configs = {attack: attack_config(config, attack) for attack in config.table.attacks}
  # A top-level attack field reaches the attacks of the table that read it (Blend's alpha
  # in a BadNets and Blend table); each other attack runs, and records, the paper's default.
  unread = {attack: validation.unread_set_fields(cfg, 'attack')
            for attack, cfg in configs.items()}
  for field, value, default, when in next(iter(unread.values())):
    if all(field in (f for f, *_ in found) for found in unread.values()):
      raise validation.ConfigError(
          f'{field} {value!r}: no attack of table.attacks {tuple(config.table.attacks)} reads '
          f'it ({validation.readers(when)}); leave it at {default!r}')
  for attack, found in unread.items():
    for field, _, default, _ in found:
      parent, leaf = field.rsplit('.', 1)
      validation.lookup(configs[attack], parent)[leaf] = default
  for attack, cfg in configs.items():
    validation.validate(cfg)
    validation.refuse_unread_fields(cfg, 'attack')
    validation.check_workdir(cfg, os.path.join(workdir, attack),
                             folders_of(config.table.defenses), evaluating=evaluating)
  return configs


def seed_config(config, seed: int):
  """The config of one seed of a `config.seeds` table: `seed` set, `seeds` empty."""
  cfg = copy.deepcopy(config)  # a deep copy keeps fp's and mcr's references to nad
  cfg.seed, cfg.seeds = seed, ()
  return cfg


def over_seeds(tables: dict) -> dict:
  """Each cell's mean and sample standard deviation over seeds.

  Args:
    tables: {seed: {'table': {attack: {defense: METRICS}}, 'average': {defense: METRICS}}}.

  Returns:
    {'table': the means (rounded to 2 decimals), 'average': the table's average over
    attacks (as `average`, so it is the row a reader computes from the table), 'std':
    {attack or 'average': {defense: {metric: sample std (ddof 1) over seeds, None for one
    seed}}}, 'seeds', 'per_seed': {seed: table}}.
  """
  first = next(iter(tables.values()))
  rows = {**{a: [t['table'][a] for t in tables.values()] for a in first['table']},
          'average': [t['average'] for t in tables.values()]}
  stat = lambda f, runs: {d: {k: f([r[d][k] for r in runs]) for k in METRICS} for d in runs[0]}
  means = {a: stat(lambda v: round(stages.mean(v), 2), runs) for a, runs in rows.items()}
  spreads = {a: stat(lambda v: None if stages.sample_std(v) is None
                     else round(stages.sample_std(v), 2), runs) for a, runs in rows.items()}
  table = {a: means[a] for a in first['table']}
  return {'table': table, 'average': average(table, list(first['average'])),
          'std': spreads, 'seeds': list(tables),
          'per_seed': {str(seed): t['table'] for seed, t in tables.items()}}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the whole comparison; writes table1.{md,csv,json} and figures.

  `table1.json` records the table's config ('config') and, per attack, the config
  its rows ran with ('details'.<attack>.'config'). With `config.seeds`, each seed's
  table is in `workdir/seed_<S>` and `table1.json` holds `over_seeds`'s figures, the
  timing and the config. A `table1_eval.json` of `evaluate_only` is removed where a
  stage trained again.

  Raises:
    ConfigError: a bad config, data or checkpoint, or a stage folder trained with
      other values; nothing is written then.
  """
  if not config.seeds:
    return run_one(config, workdir)
  total = clock()
  per_seed = {seed: seed_config(config, seed) for seed in config.seeds}
  for seed, cfg in per_seed.items():  # every seed's folders checked before any trains
    attack_configs(cfg, os.path.join(workdir, f'seed_{seed}'))
  tables = {}
  for seed, cfg in per_seed.items():
    stages.log(f'=== seed {seed} ===')
    tables[seed] = run_one(cfg, os.path.join(workdir, f'seed_{seed}'))
  results = {**over_seeds(tables), 'defenses': list(config.table.defenses),
             'attacks': list(config.table.attacks), 'timing': since(total),
             'config': config.to_dict()}
  path = os.path.join(workdir, 'table1.json')
  details = [d for t in tables.values() for d in t['details'].values()]
  results = kept_timing(path, results, details)
  stages.write_json(path, results)
  stages.remove_stale(os.path.join(workdir, 'table1_eval.json'), trained_now(details))
  write_tables(workdir, results['table'], results['average'], config.table.defenses,
               results['std'])
  return results


def run_one(config, workdir: str) -> dict:
  """`run` for one seed (`config.seed`)."""
  configs = attack_configs(config, workdir)
  defenses = tuple(config.table.defenses)
  total = clock()
  cells, report, paths = {}, {}, []
  figure_dir = os.path.join(workdir, 'figures')
  for attack in config.table.attacks:
    stages.log(f'=== {attack} ===')
    cfg = configs[attack]
    ctx = stages.setup(cfg, os.path.join(workdir, attack), folders=folders_of(defenses))
    if 'fp' in defenses:  # an unreadable plan is refused before any defense trains
      fine_pruning.kept_plan(os.path.join(ctx.workdir, 'fp'), ctx.abstract_variables['params'])
    start = clock()
    out = run_attack(ctx, defenses)
    cells[attack] = out['metrics']
    if jax.process_index() == 0 and config.table.figures:
      paths += write_figures(figure_dir, ctx, attack, out, cfg)
    out.pop('models', None)
    out['timing']['total'] = since(start)
    out['config'] = cfg.to_dict()  # what this attack's rows ran with
    report[attack] = out
    stages.log(f'[{attack}] ' + '  '.join(
        f'{NAMES[d]}: acc {m["acc"]:.2f} asr {m["asr"]:.2f}' for d, m in out['metrics'].items())
        + f'  ({out["timing"]["total"]["wall_s"]:.0f} s)')
  curves = {a: r['mcr']['curve'] for a, r in report.items() if 'mcr' in r}
  if curves and jax.process_index() == 0 and config.table.figures:
    path = os.path.join(figure_dir, 'mcr_curves.png')
    figures.mcr_curves(path, curves, config.mcr.t)
    paths.append(path)
  avg = average(cells, defenses)
  results = {'table': cells, 'average': avg, 'defenses': list(defenses),
             'attacks': list(config.table.attacks), 'details': report,
             'timing': since(total), 'figures': [os.path.relpath(p, workdir) for p in paths],
             'config': config.to_dict()}
  path = os.path.join(workdir, 'table1.json')
  stages.remove_unwritten(workdir, stages.earlier_results(path).get('figures') or [],
                          results['figures'])
  results = kept_timing(path, results)
  stages.write_json(path, results)
  stages.remove_stale(os.path.join(workdir, 'table1_eval.json'), trained_now(report.values()))
  write_tables(workdir, cells, avg, defenses)
  timing = results['timing']
  stages.log(f'total: {timing["wall_s"]:.0f} s wall, {timing["cpu_s"]:.0f} s CPU'
             + (' (the first run\'s: every stage was finished)'
                if timing.get('from_earlier_run') else
                ' (nothing trained: restored and evaluated)' if timing.get('trained_nothing')
                else ''))
  return results


def evaluation_plan(config, workdir: str) -> dict:
  """{attack: (its config, {stage folder: checkpoint})}: what `evaluate_only` restores for
  a table in `workdir`, every attack checked before anything is loaded or written.

  Raises:
    ConfigError: as `attack_configs`, or a stage without a checkpoint or unfinished
      (stages.evaluation_sources).
  """
  folders = folders_of(config.table.defenses)
  return {attack: (cfg, stages.evaluation_sources(
      cfg, os.path.join(workdir, attack), folders, f' of attack {attack!r}'))
          for attack, cfg in attack_configs(config, workdir, True).items()}


def evaluate_only(config, workdir: str) -> dict:
  """Restores every stage that `run` wrote in `workdir/<attack>/`, evaluates the
  models the table reports and writes `workdir/table1_eval.json`; trains nothing.
  With `config.seeds`, each seed's in `workdir/seed_<S>`, and `workdir/table1_eval.json`
  holds `over_seeds`'s figures.

  MCR's cell is the curve at `mcr.t`, rebuilt as `run` builds it: the saved control
  point between the backdoored and the FT model, BatchNorm recomputed on the clean
  subset. A backdoored model or teacher loaded from `student.checkpoint` or
  `teacher.checkpoint` is evaluated from there.

  Returns:
    The content of table1_eval.json: 'table' ({attack: {defense: METRICS}}, as in
    table1.json), 'average', 'stages' ({attack: {stage folder: METRICS}}, the teacher
    included), 'checkpoints' ({attack: {stage: path}}), 'attack_configs' ({attack: the
    config its rows were evaluated with}) and 'config' (the evaluation's: mcr.t, mcr.points
    and data.eval_batch_size may differ from the training run's).

  Raises:
    ConfigError: a bad config, a stage folder trained with other values, or a stage
      without a checkpoint or unfinished (every seed and attack is checked first, so
      nothing is written then).
  """
  if config.seeds:
    ran = stages.earlier_results(os.path.join(workdir, 'table1.json')).get('seeds')
    if ran and list(config.seeds) != ran:  # table1_eval.json would describe another table
      raise stages.ConfigError(f'seeds {tuple(config.seeds)}: the table in {workdir} ran seeds '
                               f'{tuple(ran)}; evaluate those (or one seed_<S> folder alone)')
    per_seed = {seed: seed_config(config, seed) for seed in config.seeds}
    for seed, cfg in per_seed.items():
      evaluation_plan(cfg, os.path.join(workdir, f'seed_{seed}'))
    tables = {seed: evaluate_only(cfg, os.path.join(workdir, f'seed_{seed}'))
              for seed, cfg in per_seed.items()}
    results = {**over_seeds(tables), 'config': config.to_dict()}
    stages.write_json(os.path.join(workdir, 'table1_eval.json'), results)
    stages.log(markdown(results['table'], results['average'], config.table.defenses,
                        results['std']))
    return results
  defenses = tuple(config.table.defenses)
  cells, evaluated, sources, configs = {}, {}, {}, {}
  for attack, (cfg, paths) in evaluation_plan(config, workdir).items():
    ctx = stages.setup(cfg, os.path.join(workdir, attack), folders=folders_of(defenses),
                       evaluating=True)
    loaded = {name: (ctx.checkpoints[name] if name in ctx.checkpoints else stages.load_checkpoint(
        path, ctx.abstract_variables, f'eval_only: stage {name!r} of attack {attack!r}'))
              for name, path in paths.items()}
    middle = loaded.pop('mcr', None)  # MCR's folder holds the curve's control point
    models = {name: stages.pretrained(ctx, variables, paths[name], f'{attack}/{name}')
              for name, variables in loaded.items()}
    metrics = {name: result.metrics for name, result in models.items()}
    if middle is not None:
      point = mcr.curve_point(ctx, cfg.mcr.t, models['backdoored'].variables, middle['params'],
                              models['ft'].variables, stages.clean_data(ctx)[0])
      metrics['mcr'] = {k: stages.evaluate(ctx, point)[k] for k in METRICS}
    cells[attack] = {d: metrics['backdoored' if d == 'none' else d] for d in defenses}
    evaluated[attack], sources[attack], configs[attack] = metrics, paths, cfg.to_dict()
  avg = average(cells, defenses)
  results = {'table': cells, 'average': avg, 'stages': evaluated, 'checkpoints': sources,
             'attack_configs': configs, 'config': config.to_dict()}
  stages.write_json(os.path.join(workdir, 'table1_eval.json'), results)
  stages.log(markdown(cells, avg, defenses))
  return results
