"""The cleaning runner behind `nad-jax-clean`: a backdoored model in; the cleaned model,
its figures before and after, and a report out.

The backdoored model is `config.student.checkpoint` (a BackdoorBench record, a
PyTorch file or a nad-jax stage folder), loaded, never trained. One defense
(`nad_jax.defenses`: NAD by default) erases its backdoor with the defender's
clean subset of the data; the stages checkpoint into `out/checkpoints`, so
rerunning the same command resumes. At the end `out` receives:

  cleaned.pth        the cleaned model as a PyTorch state_dict (strict=True loads it)
  defense/<method>/  defense_result.pt and <method>_df.csv, where the model was a
                     BackdoorBench record (backdoorbench.write_defense_result)
  results.json       metrics before (the backdoored model), of NAD's teacher (MCR: the FT
                     model its curve ends at) and after, each trained stage's per-epoch
                     history, timing, the input, the config
  report.md          the same as tables, with the figures
  curves.png, attention.png   where matplotlib is installed
"""

import copy
import importlib.util
import os
from typing import NamedTuple

import jax

from nad_jax import backdoorbench
from nad_jax import defaults
from nad_jax import defenses
from nad_jax import figures
from nad_jax import stages
from nad_jax import torch_io
from nad_jax import validation
from nad_jax.defenses import fine_pruning
from nad_jax.defenses import finetune

METHODS = ('nad', 'ft', 'fp', 'mcr')
# The stage folders each method writes under out/checkpoints (MCR's curve ends at FT's model);
# another method's, left in the same --out, are not its concern.
FOLDERS = {'nad': ('teacher', 'nad'), 'ft': ('ft',), 'fp': ('fp',), 'mcr': ('ft', 'mcr')}
MODEL_FILE = 'cleaned.pth'
# Sections and fields no cleaning reads, and why (`refuse_ignored_fields`).
UNREAD = {
    'eval_only': 'nad-jax-clean has no evaluation-only mode',
    'runner': 'nad-jax-clean picks its runner itself',
    'distributed': 'nad-jax-clean runs one process',
    'backdoor_training': 'the backdoored model is given (student.checkpoint), not trained',
}
ATTENTION_IMAGES = 6


class Outcome(NamedTuple):
  """What `run` returns.

  Attributes:
    results: the content of out/results.json.
    files: {what: path} of every file written (cleaned_model, results, report,
      and, where written, defense_result, defense_csv, curves, attention). Files an earlier
      run into the same folder listed and this one does not write are removed.
    variables: {'backdoored', 'teacher' (NAD only), 'cleaned'}: the models'
      {'params', 'batch_stats'}, on the devices.
  """
  results: dict
  files: dict
  variables: dict


def check_writable(out: str) -> None:
  """Raises ConfigError where `out` cannot be the output folder or torch is missing.

  Args:
    out: the output folder (it may not exist yet).

  Raises:
    ConfigError: `out` is empty, a file or below one (validation.check_folder), or torch
      (which writes the .pth files) is not installed.
  """
  validation.check_folder(out, 'the output folder')
  if importlib.util.find_spec('torch') is None:
    raise validation.ConfigError("writing the cleaned model as a PyTorch state_dict needs "
                                 "torch: pip install 'nad-jax[torch]'")


def unread_fields(config) -> dict:
  """UNREAD and the attack's poisoning fields (validation.poisoning_fields): {field or
  section: why no cleaning reads it}."""
  return {**UNREAD, **dict.fromkeys(validation.poisoning_fields(config.attack),
                                    'nothing is poisoned here: the backdoored model is given')}


def refuse_ignored_fields(config, method: str, trains: tuple[str, ...]) -> None:
  """Refuses what a cleaning would not read, which results.json would record as if used:
  several seeds, or a field set away from its default in `unread_fields`, in a stage section
  (teacher, fp, mcr) the cleaning does not train (FP's follows `nad`'s schedule), in
  `nad.betas` where the method does not distill, in `nad` where FP trains and neither
  follows the field nor sets its own (`defaults.fp_follows`), or in the data section where
  the data source does not read it.

  Args:
    config: the run's config, with the `fp` and `mcr` sections (defaults.defense_stages).
    method: one of METHODS.
    trains: the sections of the stages it trains (`nad` stays read: FT, FP and MCR's
      curve end train with it).

  Raises:
    ConfigError: naming the field, its value, why the run does not read it and its default.
  """
  if stages.replicas(config):  # the Python API's rule (api._context)
    raise validation.ConfigError(f'seeds {tuple(config.seeds)}: nad-jax-clean cleans with one '
                                 'seed; set seed (--seed) instead')
  unread = unread_fields(config)
  unread.update({section: f'--method {method} does not use it'
                 for section in ('teacher', 'fp', 'mcr') if section not in trains})
  if method != 'nad':
    unread['nad.betas'] = f'--method {method} does not distill (only nad reads it)'
  default = defaults.paper_config()
  followed = defaults.fp_follows(config)
  if method == 'fp':  # FP reads only the fields of NAD's schedule its own do not replace
    unread['nad'] = ("--method fp trains FP, which reads only the nad fields its own fp.* "
                     f"fields follow ({', '.join(followed) or 'none'})")
  for field in (followed if method == 'fp' else config.nad):
    if field != 'betas':
      default.nad[field] = config.nad[field]  # FP's schedule follows this run's NAD's
  defaults.defense_stages(default)
  if method == 'nad' and config.teacher.checkpoint:
    unread['teacher'] = 'the teacher is given (teacher.checkpoint), not trained'
    default.teacher.checkpoint = config.teacher.checkpoint
  expected = validation.flatten(default.to_dict())
  for field, value in validation.flatten(config.to_dict()).items():
    why = unread.get(field) or unread.get(field.partition('.')[0])
    if why and not validation.same(value, expected[field]):
      raise validation.ConfigError(f'{field} {value!r}: {why}; leave it at {expected[field]!r}')
  validation.refuse_unread_fields(config, 'data')  # e.g. a synthetic set's size beside --data


def run(config, out: str, method: str = 'nad', source: dict | None = None,
        attention_images: int = ATTENTION_IMAGES) -> Outcome:
  """Cleans `config.student.checkpoint` with `method` and writes the outputs into `out`.

  Everything a user can get wrong (config, a field the cleaning does not read, data,
  checkpoints, attack, the output folder, a checkpoint folder of another run) is checked
  before anything is written.

  Args:
    config: a config shaped like `defaults.paper_config()` with `student.checkpoint`
      set; `nad` (and `teacher`) hold the schedule; a BackdoorBench record as the
      student must agree with `model.*` (stages.check_record).
    out: the output folder; created where missing.
    method: a key of `defenses.ERASE`: 'nad', 'ft', 'fp' or 'mcr'.
    source: what the model, data and poisoned images were, as given by the user
      (results.json's 'input' and the report's header); None: taken from the config.
    attention_images: triggered test images in the attention figure (0: none).

  Returns:
    Outcome.

  Raises:
    ConfigError: a bad config (or one `refuse_ignored_fields` refuses), data, checkpoint,
      method or output folder.
    FloatingPointError: a stage's loss became non-finite.
  """
  if method not in METHODS:
    raise validation.ConfigError(f'method {method!r}: must be one of {METHODS}')
  if not config.student.checkpoint:
    raise validation.ConfigError('student.checkpoint: the backdoored model to clean is not set')
  config = copy.deepcopy(config)  # keeps FP's references to NAD's schedule (fp_follows)
  if 'mcr' not in config:  # the command line adds them, to set them
    defaults.defense_stages(config)
  trains = {'nad': ('nad',) if config.teacher.checkpoint else ('teacher', 'nad'),
            'ft': ('nad',), 'fp': ('fp',), 'mcr': ('nad', 'mcr')}[method]
  refuse_ignored_fields(config, method, trains)
  check_writable(out)
  workdir = os.path.join(out, 'checkpoints')
  validation.check_workdir(config, workdir, FOLDERS[method])  # before the data is loaded
  ctx = stages.setup(config, workdir, trains, folders=FOLDERS[method])
  if method == 'fp':  # an unreadable plan is refused before anything trains
    fine_pruning.kept_plan(os.path.join(workdir, 'fp'), ctx.abstract_variables['params'])
  record = stages.is_record(config.student.checkpoint)
  source = source or {'model': config.student.checkpoint, 'data': config.data.to_dict(),
                      'attack': config.attack.name}

  backdoored = stages.backdoored(ctx)
  # The backdoored model's evaluation doubles as epoch 0 of the stages that start from it
  # (FP's starts from the pruned model).
  known = {} if method == 'fp' else {'student_metrics': backdoored.metrics}
  clean_subset = stages.clean_data(ctx)
  results = {'backdoored': backdoored}
  if method == 'mcr':  # the curve's end: trained here to be recorded as a stage of its own
    results['ft'] = finetune.finetune(ctx, backdoored.variables, clean_subset, **known)
    known = {'fine_tuned': results['ft']}
  result = defenses.ERASE[method](ctx, backdoored.variables, clean_subset, **known)
  if method == 'nad':
    results['teacher'] = result.info['teacher']
  results[method] = result

  files = {'cleaned_model': os.path.join(out, MODEL_FILE)}
  if record:
    files['defense_result'] = os.path.join(out, 'defense', method, 'defense_result.pt')
    files['defense_csv'] = os.path.join(out, 'defense', method, f'{method}_df.csv')
  cleaned = jax.device_get(result.variables)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    torch_io.save(cleaned, files['cleaned_model'])
    if record:
      backdoorbench.write_defense_result(out, method, cleaned, config.model.name,
                                         ctx.dataset.num_classes, result.history)
    files.update(_figures(ctx, out, results, method, attention_images))
  earlier = stages.earlier_results(os.path.join(out, 'results.json'))
  stages.remove_unwritten(out, list((earlier.get('files') or {}).values()),
                          [os.path.relpath(v, out) for v in files.values()])
  timing = stages.kept_timing(earlier.get('timing') or {},
                              {name: r.timing for name, r in results.items() if r.timing})
  written = {
      'input': source,
      'method': method,
      'stages': {name: r.metrics for name, r in results.items()},
      'history': {name: r.history for name, r in results.items() if r.timing},
      'timing': stages.trained_with(timing, config.to_dict(), earlier.get('config')),
      'info': {k: v for k, v in result.info.items() if k != 'teacher'},
      **({'attack': ctx.attack.info} if ctx.attack.info else {}),
      'files': {k: os.path.relpath(v, out) for k, v in files.items()},
      'config': config.to_dict(),
  }
  files['results'] = os.path.join(out, 'results.json')
  files['report'] = os.path.join(out, 'report.md')
  stages.write_json(files['results'], written)
  if jax.process_index() == 0:
    with open(files['report'], 'w') as f:
      f.write(report(written, ctx))
  stages.log(stages.format_table(written['stages']))
  stages.log(f'wrote {out}: ' + ', '.join(os.path.relpath(v, out) for v in files.values()))
  variables = {'backdoored': backdoored.variables, 'cleaned': result.variables}
  if method == 'nad':
    variables['teacher'] = results['teacher'].variables
  return Outcome(written, files, variables)


def _figures(ctx: stages.Context, out: str, results: dict, method: str,
             count: int) -> dict:
  """curves.png (acc and asr per epoch of each trained stage) and attention.png (the
  distilled layers' maps of triggered test images, one column group per model), where
  matplotlib is installed; {} otherwise."""
  if importlib.util.find_spec('matplotlib') is None:
    return {}
  files = {'curves': os.path.join(out, 'curves.png')}
  figures.defense_curves(files['curves'],
                         {name: r.history for name, r in results.items() if r.timing},
                         f'{method}: per epoch')
  if count:
    ds = ctx.dataset
    images, _, _ = figures.triggered_examples(ctx.attack, ds.test_images, ds.test_labels,
                                              count, ctx.config.seed)
    files['attention'] = os.path.join(out, 'attention.png')
    figures.attention(files['attention'], ctx.model,
                      {name: r.variables for name, r in results.items()}, images,
                      ctx.normalize, validation.distill_layers(ctx.config), ctx.config.nad.p,
                      'attention maps of triggered test images')
  return files


def _cell(entry: dict, key: str) -> str:
  value = entry.get(key)
  if value is None:
    return ''
  if isinstance(value, list):  # NAD's AT loss per layer
    return ' / '.join(f'{v:.4g}' for v in value)
  return f'{value:.2f}' if key in stages.METRICS else f'{value:.4g}'


def report(results: dict, ctx: stages.Context) -> str:
  """report.md: the input, the metrics before and after, each stage's curve, MCR's curve
  (where the method is mcr), the figures.

  Args:
    results: the content of results.json (`run`).
    ctx: the run's Context (data sizes, attack).

  Returns:
    Markdown text.
  """
  config, method = ctx.config, results['method']
  ds = ctx.dataset
  test = ctx.attack.test_set
  poisoned = (f'{len(test.images)} given poisoned test images ({config.attack.path})'
              if test is not None else
              f'the {config.attack.name} trigger on the non-target test images')
  lines = [
      f'# Backdoor erasing with {method.upper()}', '',
      f'- model: `{results["input"]["model"]}` ({config.model.name}, '
      f'{ds.num_classes} classes, input scaling mean {config.model.mean} std '
      f'{config.model.std})',
      f'- clean data: {stages.clean_count(config, ds)} of {len(ds.train_images)} training images '
      f'({config.data.clean_fraction:g}) for the defense; {len(ds.test_images)} test images',
      f'- attack success rate measured on {poisoned}; backdoor label map '
      + (f'all_to_one (target {config.attack.target_label})'
         if config.attack.mode == 'all_to_one' else 'all_to_all (y -> y+1)'),
      '- ' + '; '.join(f'teacher: `{config.teacher.checkpoint}`'
                       if name == 'teacher' and config.teacher.checkpoint else
                       f'{name}: epochs {config[stages.SECTIONS.get(name, name)].epochs}'
                       for name in results['stages'] if name != 'backdoored'), '',
      '## Before and after', '',
      'Percentages. acc: clean test accuracy; acc_nontarget: on the test images the backdoor '
      'relabels; asr: share of poisoned test images classified as the backdoor label; ra: '
      'share classified as their true label.', '',
      '| model | ' + ' | '.join(stages.METRICS) + ' |',
      '|---|' + '---:|' * len(stages.METRICS)]
  names = {'backdoored': 'backdoored (before)', 'teacher': 'teacher',
           'ft': "ft (the curve's end)", method: f'{method} (after)'}
  for name, metrics in results['stages'].items():
    lines.append(f'| {names[name]} | ' + ' | '.join(_cell(metrics, k) for k in stages.METRICS)
                 + ' |')
  for name, history in results['history'].items():
    keys = [k for k in ('ce', 'at', *stages.METRICS) if any(k in h for h in history)]
    header = [{'at': 'at (per layer, before beta)'}.get(k, k) for k in keys]
    lines += ['', f'## {name} per epoch', '', '| epoch | ' + ' | '.join(header) + ' |',
              '|---:|' + '---:|' * len(keys)]
    lines += [f'| {h["epoch"]} | ' + ' | '.join(_cell(h, k) for k in keys) + ' |'
              for h in history]
  if 'curve' in results['info']:
    lines += ['', '## The curve (MCR)', '',
              f'The models between the backdoored one (t=0) and the ft one (t=1); the cleaned '
              f'model is t={results["info"]["t"]:g}. Every point\'s BatchNorm statistics are '
              'recomputed on the clean subset, so the ends differ from the backdoored and ft rows '
              'above, which keep their own.', '',
              '| t | ' + ' | '.join(stages.METRICS) + ' |', '|---:|' + '---:|' * len(stages.METRICS)]
    lines += [f'| {c["t"]:g} | ' + ' | '.join(_cell(c, k) for k in stages.METRICS) + ' |'
              for c in results['info']['curve']]
  for key, title in (('curves', 'acc and asr per epoch'),
                     ('attention', 'attention maps of triggered test images')):
    if key in results['files']:
      lines += ['', f'![{title}]({results["files"][key]})']
  lines += ['', '## Files', '']
  lines += [f'- `{path}`' for path in results['files'].values()]
  lines += ['- `results.json`, `report.md`',
            '- `checkpoints/`: the stages, for resuming (delete when done)', '']
  return '\n'.join(lines)
