"""The NAD pipeline: backdoored model -> teacher -> NAD student, with evaluation.

Each stage trains under its own orbax CheckpointManager in `workdir/<stage>`.
Rerunning the same command skips finished stages and resumes an interrupted
one from its last saved epoch. `config.eval_only` restores the checkpoints and
evaluates them without training.
"""

import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nad_jax import attacks as attacks_lib
from nad_jax import checkpoint as ckpt_lib
from nad_jax import data as data_lib
from nad_jax import models
from nad_jax import torch_io
from nad_jax import train as train_lib
from nad_jax.kernels import onednn

STAGES = ('backdoored', 'teacher', 'nad')
METRICS = ('acc', 'acc_nontarget', 'asr')


class ConfigError(ValueError):
  """A config value, file or path the pipeline cannot use; the message names it."""


class Context(NamedTuple):
  """What every stage shares: model, data on the devices, attack and evaluation."""
  config: Any
  workdir: str
  model: Any
  mesh: Any
  normalize: Any
  attack: attacks_lib.Attack
  dataset: data_lib.Dataset
  test_set: train_lib.TestSet
  evaluate: Any
  abstract_variables: Any


# -------------------------------------------------------------------------- validation

def validate(config) -> None:
  """Checks what can be checked before loading data; raises ConfigError."""
  def require(ok, message):
    if not ok:
      raise ConfigError(message)
  require(config.model.name in models.MODELS,
          f'model.name {config.model.name!r} is unknown; choose one of {sorted(models.MODELS)}')
  require(config.model.dtype in models.DTYPES,
          f'model.dtype {config.model.dtype!r} is unknown; choose one of {sorted(models.DTYPES)}')
  require(config.model.conv in models.CONVS,
          f'model.conv {config.model.conv!r} is unknown; choose one of {models.CONVS}')
  if config.model.conv == 'onednn':
    require(jax.default_backend() == 'cpu' and jax.device_count() == 1,
            "model.conv 'onednn' runs on one CPU device; this run has "
            f'{jax.device_count()} {jax.default_backend()} device(s)')
    try:
      onednn.load()
    except onednn.OnednnUnavailable as e:
      raise ConfigError(f"model.conv 'onednn': {e}") from None
  require(config.attack.name in attacks_lib.ATTACKS,
          f'attack.name {config.attack.name!r} is unknown; '
          f'choose one of {sorted(attacks_lib.ATTACKS)}')
  require(0.0 <= config.attack.poison_rate <= 1.0,
          f'attack.poison_rate must be in [0, 1], got {config.attack.poison_rate}')
  require(0.0 < config.data.clean_fraction <= 1.0,
          f'data.clean_fraction must be in (0, 1], got {config.data.clean_fraction}')
  if config.data.source == 'folder':
    require(bool(config.data.path) and os.path.isdir(config.data.path),
            f'data.path {config.data.path!r} is not a directory')
  devices = jax.device_count()
  for stage in ('backdoor_training', 'teacher', 'nad'):
    cfg = config[stage]
    require(cfg.epochs >= 0, f'{stage}.epochs must be >= 0, got {cfg.epochs}')
    require(cfg.batch_size > 0 and cfg.batch_size % devices == 0,
            f'{stage}.batch_size must be a positive multiple of the {devices} devices, '
            f'got {cfg.batch_size}')
    require(cfg.learning_rate > 0, f'{stage}.learning_rate must be > 0, got {cfg.learning_rate}')
    require(cfg.get('eval_every', 1) >= 1,
            f'{stage}.eval_every must be >= 1, got {cfg.get("eval_every")}')
  require(config.data.eval_batch_size % devices == 0,
          f'data.eval_batch_size must be a multiple of the {devices} devices')
  layers = distill_layers(config)
  require(len(config.nad.betas) == len(layers),
          f'nad.betas has {len(config.nad.betas)} weights for {len(layers)} layers {layers}')
  for path_field in ('student.checkpoint', 'teacher.checkpoint'):
    section, key = path_field.split('.')
    path = config[section][key]
    require(not path or os.path.exists(path), f'{path_field} {path!r} does not exist')


def distill_layers(config) -> tuple[str, ...]:
  """The layers NAD distils: `nad.layers`, or the model's low/middle/high groups."""
  if config.nad.get('layers'):
    return tuple(config.nad.layers)
  model = models.build_model(config.model.name, 10)
  return tuple(model.distill_layers)


def validate_data(config, dataset: data_lib.Dataset) -> None:
  if not 0 <= config.attack.target_label < dataset.num_classes:
    raise ConfigError(f'attack.target_label must be in [0, {dataset.num_classes}), '
                      f'got {config.attack.target_label}')
  for stage, size in (('backdoor_training', len(dataset.train_images)),
                      ('teacher', clean_count(config, dataset)),
                      ('nad', clean_count(config, dataset))):
    if config[stage].epochs and config[stage].batch_size > size:
      raise ConfigError(f'{stage}.batch_size {config[stage].batch_size} exceeds the '
                        f'{size} training images of that stage')


def clean_count(config, dataset) -> int:
  return len(data_lib.clean_subset(len(dataset.train_images), config.data.clean_fraction,
                                   config.seed))


# ------------------------------------------------------------------------------ stages

def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def evaluate(ctx: Context, variables) -> dict:
  key = jax.random.key(ctx.config.seed + 7)  # same trigger draws for every evaluation
  metrics = jax.device_get(ctx.evaluate(variables, ctx.test_set, key))
  return {k: round(float(v), 4) for k, v in metrics.items()}


def evaluated_epoch(epoch: int, stage_cfg) -> bool:
  """Whether the stage evaluates and checkpoints after `epoch` (1-based): every
  `eval_every` epochs and after the last. A killed run resumes from the last one."""
  return epoch % stage_cfg.get('eval_every', 1) == 0 or epoch == stage_cfg.epochs


def recipe_for(stage_cfg, distill: tuple = (), layers: tuple = (), p: float = 2.0):
  return train_lib.Recipe(batch_size=stage_cfg.batch_size, crop_flip=stage_cfg.crop_flip,
                          cutout=stage_cfg.cutout, betas=tuple(distill), layers=tuple(layers),
                          p=p)


def train_stage(ctx: Context, name: str, stage_cfg, recipe: train_lib.Recipe, init_variables,
                images, labels, poisoned, attack, teacher=None, key_stage: str | None = None):
  """Trains (or resumes) one stage; returns (variables, history, timing).

  The stage's PRNG stream (batch order, augmentation) is that of `key_stage`
  (default: `name`, one of STAGES): the baseline defenses use NAD's, so every
  defense sees the same batches.
  """
  steps_per_epoch = len(images) // stage_cfg.batch_size
  tx = train_lib.make_optimizer(stage_cfg, steps_per_epoch)
  state = train_lib.state_from_variables(init_variables, tx)
  state = train_lib.replicate(state, ctx.mesh)
  checkpoints = ckpt_lib.StageCheckpoints(os.path.join(ctx.workdir, name))
  done = checkpoints.latest_epoch()
  if done is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state, history = checkpoints.restore(done, abstract)
    log(f'[{name}] resumed from epoch {done}')
  else:
    done, history = 0, [{'epoch': 0, **evaluate(ctx, state.variables)}]
  timing = {'compile_s': 0.0, 'img_per_s': []}
  if done < stage_cfg.epochs:
    on_device = train_lib.replicate((images, labels, poisoned), ctx.mesh)
    teacher = teacher if teacher is not None else {}
    run_epoch = train_lib.TrainEpoch(ctx.model, tx, ctx.mesh, recipe, ctx.normalize, attack,
                                     ctx.config.get('scan_epoch'))
    start = time.perf_counter()
    run_epoch.compile(state, teacher, *on_device)
    timing['compile_s'] = round(time.perf_counter() - start, 2)
    stage_key = jax.random.fold_in(jax.random.key(ctx.config.seed),
                                   STAGES.index(key_stage or name))
    for epoch in range(done, stage_cfg.epochs):
      start = time.perf_counter()
      state, losses = run_epoch(state, teacher, *on_device, jax.random.fold_in(stage_key, epoch))
      losses = jax.device_get(losses)
      seconds = time.perf_counter() - start
      if not np.isfinite(losses['ce']) or not np.all(np.isfinite(losses['at'])):
        raise FloatingPointError(f'{name}: the loss became non-finite in epoch {epoch + 1}; '
                                 'lower its learning_rate')
      speed = steps_per_epoch * stage_cfg.batch_size / seconds
      timing['img_per_s'].append(round(speed, 1))
      entry = {'epoch': epoch + 1, 'ce': round(float(losses['ce']), 5)}
      if recipe.betas:
        entry['at'] = [round(float(a), 7) for a in losses['at']]
      message = (f'[{name}] epoch {epoch + 1}/{stage_cfg.epochs}  ce {entry["ce"]:.4f}'
                 + (f'  at {sum(b * a for b, a in zip(recipe.betas, entry["at"])):.4f}'
                    if recipe.betas else ''))
      evaluated = evaluated_epoch(epoch + 1, stage_cfg)
      if evaluated:
        entry.update(evaluate(ctx, state.variables))
        message += (f'  acc {entry["acc"]:.2f}  acc_nontarget {entry["acc_nontarget"]:.2f}'
                    f'  asr {entry["asr"]:.2f}')
      history.append(entry)
      log(f'{message}  ({speed:.0f} img/s)')
      if evaluated:
        checkpoints.save(epoch + 1, state, history)
  checkpoints.close()
  return state.variables, history, timing


def pretrained(ctx: Context, path: str, name: str):
  """Variables from a checkpoint path, evaluated once; returns (variables, history, timing)."""
  try:
    if os.path.isfile(path) and path.endswith(torch_io.SUFFIXES):  # a PyTorch checkpoint
      variables = torch_io.load(path, ctx.abstract_variables)
    else:
      variables = ckpt_lib.load_variables(path, ctx.abstract_variables)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'{name}: {e}') from None
  variables = train_lib.replicate(variables, ctx.mesh)
  log(f'[{name}] loaded {path}')
  return variables, [{'epoch': 0, 'checkpoint': path, **evaluate(ctx, variables)}], {}


# -------------------------------------------------------------------------------- run

def setup(config, workdir: str) -> Context:
  validate(config)
  try:
    dataset = data_lib.load_dataset(config.data, config.seed)
  except data_lib.DataError as e:
    raise ConfigError(str(e)) from None
  validate_data(config, dataset)
  try:
    attack = attacks_lib.build_attack(config.attack, dataset.num_classes,
                                      dataset.train_images.shape[1:], dataset)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = models.build_model(config.model.name, dataset.num_classes, config.model.dtype,
                             config.model.conv)
  mesh = train_lib.make_mesh()
  normalize = train_lib.normalizer(config.model.mean, config.model.std)
  image_shape = dataset.train_images.shape[1:]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               train=False, mutable=True))
  sown = tuple(abstract.pop('intermediates', {}))
  unknown = [layer for layer in distill_layers(config) if layer not in sown]
  if unknown:
    raise ConfigError(f'nad.layers {unknown} are not sown by {config.model.name}; '
                      f'choose from {sown}')
  test_set = train_lib.make_test_set(dataset.test_images, dataset.test_labels,
                                     config.data.eval_batch_size, mesh)
  return Context(config, workdir, model, mesh, normalize, attack, dataset, test_set,
                 train_lib.make_evaluate(model, mesh, normalize, attack, config.get('scan_epoch')),
                 abstract)


def clean_data(ctx: Context):
  """The defender's clean subset: (images, labels, an all-False poisoned mask)."""
  ds, config = ctx.dataset, ctx.config
  clean = data_lib.clean_subset(len(ds.train_images), config.data.clean_fraction, config.seed)
  return ds.train_images[clean], ds.train_labels[clean], np.zeros(len(clean), bool)


def backdoored_stage(ctx: Context):
  """`student.checkpoint`, or the model trained under the attack: (variables, history, timing)."""
  ds, config, seed = ctx.dataset, ctx.config, ctx.config.seed
  poisoned = attacks_lib.poison_mask(ds.train_labels, ctx.attack, config.attack.poison_rate,
                                     np.random.default_rng([seed, 2]))
  log(f'{len(ds.train_images)} training images ({poisoned.sum()} poisoned by '
      f'{ctx.attack.name}), {clean_count(config, ds)} clean for the defense, '
      f'{len(ds.test_images)} test; {jax.device_count()} {jax.default_backend()} device(s)')
  if config.student.checkpoint:
    return pretrained(ctx, config.student.checkpoint, 'backdoored')
  init = ctx.model.init(jax.random.key(seed), jnp.zeros((1, *ds.train_images.shape[1:])),
                        train=False)
  victim_set = attacks_lib.prepare(ctx.attack, ds.train_images, ds.train_labels, poisoned, seed)
  return train_stage(ctx, 'backdoored', config.backdoor_training,
                     recipe_for(config.backdoor_training), init, *victim_set, ctx.attack)


def teacher_stage(ctx: Context, student):
  """`teacher.checkpoint`, or trained on the clean subset, CE only, from the backdoored
  student (teacher.source 'finetune', the paper's) or from a fresh initialisation
  ('scratch': an independently trained clean model)."""
  config = ctx.config
  if config.teacher.checkpoint:
    return pretrained(ctx, config.teacher.checkpoint, 'teacher')
  source = config.teacher.get('source') or 'finetune'
  if source == 'scratch':
    shape = ctx.dataset.train_images.shape[1:]
    student = ctx.model.init(jax.random.key(config.seed + 1), jnp.zeros((1, *shape)),
                             train=False)
  elif source != 'finetune':
    raise ConfigError(f"teacher.source must be 'finetune' or 'scratch', got {source!r}")
  return train_stage(ctx, 'teacher', config.teacher, recipe_for(config.teacher), student,
                     *clean_data(ctx), None)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage and writes `workdir/results.json`."""
  ctx = setup(config, workdir)
  clean_images, clean_labels, no_poison = clean_data(ctx)
  stages = {'backdoored': backdoored_stage(ctx)}
  student = stages['backdoored'][0]
  stages['teacher'] = teacher_stage(ctx, student)

  nad_recipe = recipe_for(config.nad, config.nad.betas, distill_layers(config), config.nad.p)
  stages['nad'] = train_stage(ctx, 'nad', config.nad, nad_recipe, student, clean_images,
                              clean_labels, no_poison, None, teacher=stages['teacher'][0])

  results = {
      'stages': {name: {k: history[-1][k] for k in METRICS}
                 for name, (_, history, _) in stages.items()},
      'history': {name: history for name, (_, history, _) in stages.items()},
      'timing': {name: timing for name, (_, _, timing) in stages.items()},
      'config': config.to_dict(),
  }
  write_json(os.path.join(workdir, 'results.json'), results)
  log(format_table(results['stages']))
  return results


def evaluate_only(config, workdir: str) -> dict:
  """Restores each stage's checkpoint (workdir or configured path), evaluates, writes eval.json."""
  ctx = setup(config, workdir)
  sources = {'backdoored': config.student.checkpoint or os.path.join(workdir, 'backdoored'),
             'teacher': config.teacher.checkpoint or os.path.join(workdir, 'teacher'),
             'nad': os.path.join(workdir, 'nad')}
  stages = {}
  for name, path in sources.items():
    if not os.path.exists(path):  # a stage folder, or a PyTorch file
      raise ConfigError(f'eval_only: no checkpoint for stage {name!r} at {path}')
    stages[name] = pretrained(ctx, path, name)[1][-1]
  results = {'stages': {n: {k: m[k] for k in METRICS} for n, m in stages.items()},
             'checkpoints': sources}
  write_json(os.path.join(workdir, 'eval.json'), results)
  log(format_table(results['stages']))
  return results


def write_json(path: str, content: dict) -> None:
  """Writes atomically: a temporary file renamed over the target."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(content, f, indent=1, default=str)
  os.replace(tmp, path)


def format_table(stages: dict) -> str:
  lines = [f'{"stage":<12}{"acc":>9}{"acc_nontarget":>15}{"asr":>9}']
  for name, m in stages.items():
    lines.append(f'{name:<12}{m["acc"]:>9.2f}{m["acc_nontarget"]:>15.2f}{m["asr"]:>9.2f}')
  return '\n'.join(lines)
