"""The comparison of the paper's Table 1: attacks x {no defense, FT, FP, MCR, NAD}.

For each attack of `config.table.attacks` (its settings: `config.table.attack_configs`)
one backdoored model is trained (or loaded) in `workdir/<attack>/backdoored`,
and every defense of `config.table.defenses` starts from it, each a stage in
`workdir/<attack>/<stage>` (ft, fp, mcr, teacher, nad): rerunning skips what is
done and resumes what is not. Writes `workdir/table1.{md,csv,json}` (ACC,
ACC on non-target images, ASR per cell, and the average over attacks) and the
figures in `workdir/figures/`.
"""

import csv
import io
import os
import time

import jax
import numpy as np

from nad_jax import figures
from nad_jax import pipeline
from nad_jax import validation
from nad_jax.defenses import NAMES
from nad_jax.defenses import fine_pruning
from nad_jax.defenses import finetune
from nad_jax.defenses import mcr

METRICS = pipeline.METRICS


def attack_config(config, attack: str):
  """`config` with `config.attack` replaced by the table's settings for `attack`."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.attack = cfg.table.attack_configs[attack]
  return cfg


def clock():
  return time.perf_counter(), time.process_time()


def since(start) -> dict:
  wall, cpu = clock()
  return {'wall_s': round(wall - start[0], 1), 'cpu_s': round(cpu - start[1], 1)}


def run_attack(ctx: pipeline.Context, defenses) -> dict:
  """Every defense against one attack; returns {'metrics', 'history', 'timing', ...}."""
  out = {'metrics': {}, 'history': {}, 'timing': {}, 'stage_timing': {}}

  def record(key, result, metrics=None):
    variables, history, timing = result[:3]
    out['history'][key] = history
    out['stage_timing'][key] = timing
    if metrics is not None:
      out['metrics'][key] = {k: metrics[k] for k in METRICS}
    return variables

  clean = pipeline.clean_data(ctx)
  start = clock()
  student = record('none', pipeline.backdoored_stage(ctx))
  out['metrics']['none'] = {k: out['history']['none'][-1][k] for k in METRICS}
  out['timing']['backdoored'] = since(start)
  ft = None
  if 'ft' in defenses or 'mcr' in defenses:
    start = clock()
    result = finetune.finetune(ctx, student, clean)
    ft = record('ft', result, result[1][-1] if 'ft' in defenses else None)
    out['timing']['ft'] = since(start)
  if 'fp' in defenses:
    start = clock()
    result = fine_pruning.fine_prune(ctx, student, clean)
    record('fp', result, result[1][-1])
    out['fine_pruning'] = result[3]
    out['timing']['fp'] = since(start)
  if 'mcr' in defenses:
    start = clock()
    result = mcr.repair(ctx, student, ft, clean)
    at_t = next(c for c in result[3]['curve'] if c['t'] == result[3]['t'])
    record('mcr', result, at_t)
    out['mcr'] = result[3]
    out['timing']['mcr'] = since(start)
  if 'nad' in defenses:
    start = clock()
    teacher = record('teacher', pipeline.teacher_stage(ctx, student))
    nad = record('nad', finetune.nad(ctx, student, teacher, clean))
    out['metrics']['nad'] = {k: out['history']['nad'][-1][k] for k in METRICS}
    out['timing']['nad'] = since(start)
    out['models'] = {'backdoored': student, 'teacher': teacher, 'NAD': nad}
  return out


def average(cells: dict, defenses) -> dict:
  return {d: {k: round(float(np.mean([cells[a][d][k] for a in cells])), 2) for k in METRICS}
          for d in defenses}


def markdown(cells: dict, avg: dict, defenses) -> str:
  head = '| Attack | ' + ' | '.join(f'{NAMES[d]} ASR | {NAMES[d]} ACC' for d in defenses) + ' |'
  lines = [head, '|' + '---|' * (1 + 2 * len(defenses))]
  for name, row in [*cells.items(), ('**Average**', avg)]:
    lines.append(f'| {name} | ' + ' | '.join(f'{row[d]["asr"]:.2f} | {row[d]["acc"]:.2f}'
                                          for d in defenses) + ' |')
  return '\n'.join(lines) + '\n'


def csv_text(cells: dict, avg: dict, defenses) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['attack', 'defense', *METRICS])
  for name, row in [*cells.items(), ('average', avg)]:
    for d in defenses:
      writer.writerow([name, d, *(f'{row[d][k]:.2f}' for k in METRICS)])
  return buffer.getvalue()


def write_figures(figure_dir: str, ctx, attack: str, out: dict, config) -> list:
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


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the whole comparison; writes table1.{md,csv,json} and figures."""
  validation.validate(config)
  for attack in config.table.attacks:  # every attack's config and stage folders, before any trains
    validation.validate(attack_config(config, attack))
    validation.check_workdir(attack_config(config, attack), os.path.join(workdir, attack),
                             ('backdoored', 'teacher', 'nad', 'ft', 'fp', 'mcr'))
  defenses = tuple(config.table.defenses)
  total = clock()
  cells, report, paths = {}, {}, []
  figure_dir = os.path.join(workdir, 'figures')
  for attack in config.table.attacks:
    pipeline.log(f'=== {attack} ===')
    cfg = attack_config(config, attack)
    ctx = pipeline.setup(cfg, os.path.join(workdir, attack))
    validation.check_workdir(cfg, ctx.workdir, ('backdoored', 'teacher', 'nad', 'ft', 'fp', 'mcr'),
                             ctx.data_digest)
    start = clock()
    out = run_attack(ctx, defenses)
    cells[attack] = out['metrics']
    if jax.process_index() == 0 and config.table.figures:
      paths += write_figures(figure_dir, ctx, attack, out, cfg)
    out.pop('models', None)
    out['timing']['total'] = since(start)
    report[attack] = out
    pipeline.log(f'[{attack}] ' + '  '.join(
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
  pipeline.write_json(os.path.join(workdir, 'table1.json'), results)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'table1.md'), 'w') as f:
      f.write(markdown(cells, avg, defenses))
    with open(os.path.join(workdir, 'table1.csv'), 'w') as f:
      f.write(csv_text(cells, avg, defenses))
  pipeline.log(markdown(cells, avg, defenses))
  pipeline.log(f'total: {results["timing"]["wall_s"]:.0f} s wall, '
               f'{results["timing"]["cpu_s"]:.0f} s CPU')
  return results
