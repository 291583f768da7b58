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
from nad_jax import validation
from nad_jax.kernels import onednn

STAGES = ('backdoored', 'teacher', 'nad')
# The config section that trains a stage, where its name differs (FT trains with NAD's).
SECTIONS = {'backdoored': 'backdoor_training', 'ft': 'nad'}
ConfigError = validation.ConfigError
METRICS = ('acc', 'acc_nontarget', 'asr')


class Context(NamedTuple):
  """What every stage shares: model, data on the devices, attack and evaluation."""
  config: Any
  workdir: str | None  # None: stages keep no checkpoints
  model: Any
  mesh: Any
  normalize: Any
  attack: attacks_lib.Attack
  dataset: data_lib.Dataset
  poisoned: np.ndarray  # (N,) bool: the training images the attack poisons
  test_set: train_lib.TestSet
  evaluate: Any
  abstract_variables: Any
  checkpoints: dict  # {'backdoored' | 'teacher': variables} from student/teacher.checkpoint
  data_digest: str  # validation.data_digest of `dataset`


# -------------------------------------------------------------------------- validation

def validate(config) -> None:
  """validation.RULES, then whether oneDNN can be loaded where it is asked for."""
  validation.validate(config)
  if config.model.conv == 'onednn':
    try:
      onednn.load()
    except onednn.OnednnUnavailable as e:
      raise ConfigError(f"model.conv 'onednn': {e}") from None


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


def open_stage(ctx: Context, name: str) -> ckpt_lib.StageCheckpoints:
  """The stage's checkpoints in `workdir/name`, with the config fields that shape it
  recorded there before its first epoch (validation.check_workdir reads them)."""
  directory = os.path.join(ctx.workdir, name)
  validation.record_stage(ctx.config, directory, name, ctx.data_digest)
  return ckpt_lib.StageCheckpoints(directory)


def restore_stage(checkpoints: ckpt_lib.StageCheckpoints, name: str, epoch: int, state):
  """(state, history) saved at `epoch`, laid out like `state`; ConfigError if it cannot be."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = checkpoints.restore(epoch, abstract)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'{name}: {e}') from None
  log(f'[{name}] resumed from epoch {epoch}')
  return restored


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
  checkpoints = open_stage(ctx, name) if ctx.workdir is not None else None
  done = checkpoints.latest_epoch() if checkpoints else None
  if done is not None:
    state, history = restore_stage(checkpoints, name, done, state)
  else:
    done, history = 0, [{'epoch': 0, **evaluate(ctx, state.variables)}]
  timing = {'compile_s': 0.0, 'img_per_s': []}
  if done < stage_cfg.epochs:
    on_device = train_lib.replicate((images, labels, poisoned), ctx.mesh)
    teacher = teacher if teacher is not None else {}
    run_epoch = train_lib.TrainEpoch(ctx.model, tx, ctx.mesh, recipe, ctx.normalize, attack,
                                     ctx.config.get('scan_epoch'))
    log(f'[{name}] compiling the training step')
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
      distilled = any(recipe.betas)
      if not np.isfinite(losses['ce']) or (distilled and not np.all(np.isfinite(losses['at']))):
        section = SECTIONS.get(name, name)
        raise FloatingPointError(
            f'{name}: the loss became non-finite in epoch {epoch + 1} (ce {losses["ce"]}'
            + (f', AT per layer {list(losses["at"])}; lower nad.betas '
               f'{tuple(recipe.betas)} or {section}.learning_rate, or check nad.p {recipe.p}'
               if distilled else f'; lower {section}.learning_rate') + ')')
      speed = steps_per_epoch * stage_cfg.batch_size / seconds
      timing['img_per_s'].append(round(speed, 1))
      entry = {'epoch': epoch + 1, 'ce': round(float(losses['ce']), 5)}
      if distilled:  # with every beta 0 the AT term is not computed, so not recorded
        entry['at'] = [round(float(a), 7) for a in losses['at']]
      message = (f'[{name}] epoch {epoch + 1}/{stage_cfg.epochs}  ce {entry["ce"]:.4f}'
                 + (f'  at {sum(b * a for b, a in zip(recipe.betas, entry["at"])):.4f}'
                    if distilled else ''))
      evaluated = evaluated_epoch(epoch + 1, stage_cfg)
      if evaluated:
        entry.update(evaluate(ctx, state.variables))
        message += (f'  acc {entry["acc"]:.2f}  acc_nontarget {entry["acc_nontarget"]:.2f}'
                    f'  asr {entry["asr"]:.2f}')
      history.append(entry)
      log(f'{message}  ({speed:.0f} img/s)')
      if evaluated and checkpoints:
        checkpoints.save(epoch + 1, state, history)
  if checkpoints:
    checkpoints.close()
  return state.variables, history, timing


def load_checkpoint(path: str, abstract_variables, field: str) -> dict:
  """Variables from a PyTorch file (whatever its name) or a nad-jax stage folder.

  Args:
    path: the file or folder.
    abstract_variables: the model's {'params', 'batch_stats'} shapes and dtypes.
    field: the config field that named `path`, for the message.

  Returns:
    Host variables shaped like `abstract_variables`.

  Raises:
    ConfigError: one line naming `field` and `path`: missing, unreadable, or not this model.
  """
  try:
    if os.path.isfile(path):
      return torch_io.load(path, abstract_variables)
    if os.path.isdir(path):
      return ckpt_lib.load_variables(path, abstract_variables)
    raise ckpt_lib.CheckpointError(f'{path} does not exist')
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'{field}: {e}') from None


def pretrained(ctx: Context, variables, path: str, name: str):
  """Loaded variables, evaluated once: (variables, history, timing) as a stage returns."""
  variables = train_lib.replicate(variables, ctx.mesh)
  log(f'[{name}] loaded {path}')
  return variables, [{'epoch': 0, 'checkpoint': path, **evaluate(ctx, variables)}], {}


# -------------------------------------------------------------------------------- run

# The stages a config may load instead of training, and the fields that name the file.
LOADABLE = {'backdoored': 'student.checkpoint', 'teacher': 'teacher.checkpoint'}


def setup(config, workdir: str | None) -> Context:
  """Checks the config, loads the data, builds the attack and model: what stages share.

  Everything a user can get wrong is checked here, before any stage writes: the
  config's rules, the data, the attack's poisoned samples, and the student and
  teacher checkpoints (opened and checked against the model).

  Raises:
    ConfigError: naming the field, file or folder.
  """
  validate(config)
  where = {'folder': config.data.path, 'tfds': config.data.name}.get(config.data.source, 'made in memory')
  log(f'loading the {config.data.source} data ({where})')
  try:
    dataset = data_lib.load_dataset(config.data, config.seed)
  except data_lib.DataError as e:
    raise ConfigError(str(e)) from None
  return make_context(config, dataset, workdir)


def make_context(config, dataset: data_lib.Dataset, workdir: str | None,
                 stages: tuple[str, ...] = validation.TRAINED_SECTIONS) -> Context:
  """The Context of a validated config over `dataset` (host arrays).

  Args:
    config: a config that passed `validate`.
    dataset: the data the stages train and evaluate on.
    workdir: where stages checkpoint; None: they keep nothing (the Python API).
    stages: the config sections that will train, whose batch sizes must fit the data.

  Raises:
    ConfigError: the rules that need the data, the attack, the checkpoints to load.
  """
  validation.validate_data(config, dataset.num_classes, len(dataset.train_images),
                           clean_count(config, dataset), dataset.test_labels, stages)
  try:
    attack = attacks_lib.build_attack(config.attack, dataset.num_classes,
                                      dataset.train_images.shape[1:], dataset, fit=train_lib.fit)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  poisoned = attacks_lib.poison_mask(dataset.train_labels, attack, config.attack.poison_rate,
                                     np.random.default_rng([config.seed, 2]))
  if not config.student.checkpoint:
    labels = dataset.train_labels
    candidates = (int(np.sum(np.asarray(attack.relabel(labels)) == labels))
                  if attack.clean_label else len(labels))
    validation.validate_poisoning(config, int(poisoned.sum()), candidates)
  model = models.build_model(config.model.name, dataset.num_classes, config.model.dtype,
                             config.model.conv)
  mesh = train_lib.make_mesh()
  normalize = train_lib.normalizer(config.model.mean, config.model.std)
  image_shape = dataset.train_images.shape[1:]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               train=False, mutable=True))
  sown = tuple(abstract.pop('intermediates', {}))
  unknown = [layer for layer in validation.distill_layers(config) if layer not in sown]
  if unknown:
    raise ConfigError(f'nad.layers {unknown} are not sown by {config.model.name}; '
                      f'choose from {sown}')
  loaded = {stage: load_checkpoint(validation.lookup(config, field), abstract, field)
            for stage, field in LOADABLE.items() if validation.lookup(config, field)}
  test_set = train_lib.make_test_set(dataset.test_images, dataset.test_labels,
                                     config.data.eval_batch_size, mesh)
  return Context(config, workdir, model, mesh, normalize, attack, dataset, poisoned, test_set,
                 train_lib.make_evaluate(model, mesh, normalize, attack, config.get('scan_epoch')),
                 abstract, loaded, validation.data_digest(dataset))


def clean_data(ctx: Context):
  """The defender's clean subset: (images, labels, an all-False poisoned mask)."""
  ds, config = ctx.dataset, ctx.config
  clean = data_lib.clean_subset(len(ds.train_images), config.data.clean_fraction, config.seed)
  return ds.train_images[clean], ds.train_labels[clean], np.zeros(len(clean), bool)


def finished(directory: str, epochs: int) -> bool:
  """Whether the stage folder holds its last epoch's checkpoint."""
  return max(ckpt_lib.finished_epochs(directory), default=-1) >= epochs


PREPARED = 'prepared_training_set.npz'


def victim_set(ctx: Context, directory: str | None):
  """The training set the victim trains on, after `Attack.prepare` (e.g. CL's surrogate
  training and PGD). It is kept in the stage folder until the stage finishes, so a
  resumed stage reuses it instead of preparing it again."""
  ds = ctx.dataset
  if ctx.attack.prepare is None:
    return ds.train_images, ds.train_labels, ctx.poisoned
  if directory is None:
    return attacks_lib.prepare(ctx.attack, ds.train_images, ds.train_labels, ctx.poisoned,
                               ctx.config.seed)
  path = os.path.join(directory, PREPARED)
  if os.path.isfile(path):
    with np.load(path) as saved:
      log(f'[backdoored] reusing the prepared training set in {path}')
      return saved['images'], saved['labels'], saved['poisoned']
  prepared = attacks_lib.prepare(ctx.attack, ds.train_images, ds.train_labels, ctx.poisoned,
                                 ctx.config.seed)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, images=prepared[0], labels=prepared[1], poisoned=prepared[2])
    os.replace(tmp, path)
  return prepared


def backdoored_stage(ctx: Context):
  """`student.checkpoint`, or the model trained under the attack: (variables, history, timing).

  A finished stage is restored without preparing the attack again.
  """
  ds, config, seed = ctx.dataset, ctx.config, ctx.config.seed
  log(f'{len(ds.train_images)} training images ({ctx.poisoned.sum()} poisoned by '
      f'{ctx.attack.name}), {clean_count(config, ds)} clean for the defense, '
      f'{len(ds.test_images)} test; {jax.device_count()} {jax.default_backend()} device(s)')
  if 'backdoored' in ctx.checkpoints:
    return pretrained(ctx, ctx.checkpoints['backdoored'], config.student.checkpoint,
                      'backdoored')
  init = ctx.model.init(jax.random.key(seed), jnp.zeros((1, *ds.train_images.shape[1:])),
                        train=False)
  directory = ctx.workdir and os.path.join(ctx.workdir, 'backdoored')
  if directory and finished(directory, config.backdoor_training.epochs):
    training_set = ds.train_images, ds.train_labels, ctx.poisoned  # nothing left to train
  else:
    training_set = victim_set(ctx, directory)
  result = train_stage(ctx, 'backdoored', config.backdoor_training,
                       recipe_for(config.backdoor_training), init, *training_set, ctx.attack)
  if directory and jax.process_index() == 0 and os.path.isfile(os.path.join(directory, PREPARED)):
    os.remove(os.path.join(directory, PREPARED))
  return result


def teacher_stage(ctx: Context, student):
  """`teacher.checkpoint`, or trained on the clean subset, CE only, from the backdoored
  student (teacher.source 'finetune', the paper's) or from a fresh initialisation
  ('scratch': an independently trained clean model)."""
  config = ctx.config
  if 'teacher' in ctx.checkpoints:
    return pretrained(ctx, ctx.checkpoints['teacher'], config.teacher.checkpoint, 'teacher')
  if config.teacher.source == 'scratch':
    shape = ctx.dataset.train_images.shape[1:]
    student = ctx.model.init(jax.random.key(config.seed + 1), jnp.zeros((1, *shape)),
                             train=False)
  return train_stage(ctx, 'teacher', config.teacher, recipe_for(config.teacher), student,
                     *clean_data(ctx), None)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage and writes `workdir/results.json`.

  Raises:
    ConfigError: a bad config, data or checkpoint, or a workdir whose stages were
      trained with other values (validation.check_workdir); nothing is written then.
  """
  ctx = setup(config, workdir)
  validation.check_workdir(config, workdir, STAGES, ctx.data_digest)
  clean_images, clean_labels, no_poison = clean_data(ctx)
  stages = {'backdoored': backdoored_stage(ctx)}
  student = stages['backdoored'][0]
  stages['teacher'] = teacher_stage(ctx, student)

  nad_recipe = recipe_for(config.nad, config.nad.betas, validation.distill_layers(config),
                          config.nad.p)
  stages['nad'] = train_stage(ctx, 'nad', config.nad, nad_recipe, student, clean_images,
                              clean_labels, no_poison, None, teacher=stages['teacher'][0])

  path = os.path.join(workdir, 'results.json')
  results = {
      'stages': {name: {k: history[-1][k] for k in METRICS}
                 for name, (_, history, _) in stages.items()},
      'history': {name: history for name, (_, history, _) in stages.items()},
      'timing': kept_timing(path, {name: timing for name, (_, _, timing) in stages.items()}),
      'config': config.to_dict(),
  }
  write_json(path, results)
  log(format_table(results['stages']))
  return results


def kept_timing(path: str, timing: dict) -> dict:
  """`timing`, where a stage trained nothing in this run, replaced by the timing that the
  results file at `path` recorded for it, marked `from_earlier_run`."""
  try:
    with open(path) as f:
      earlier = json.load(f)['timing']
  except (OSError, ValueError, KeyError, TypeError):
    return timing
  return {name: ({**earlier[name], 'from_earlier_run': True}
                 if not t.get('img_per_s') and earlier.get(name, {}).get('img_per_s') else t)
          for name, t in timing.items()}


def evaluate_only(config, workdir: str) -> dict:
  """Restores each stage's checkpoint (workdir or configured path), evaluates, writes eval.json."""
  ctx = setup(config, workdir)
  sources = {'backdoored': config.student.checkpoint or os.path.join(workdir, 'backdoored'),
             'teacher': config.teacher.checkpoint or os.path.join(workdir, 'teacher'),
             'nad': os.path.join(workdir, 'nad')}
  for name, path in sources.items():
    if not os.path.exists(path):  # a stage folder, or a PyTorch file
      raise ConfigError(f'eval_only: no checkpoint for stage {name!r} at {path}')
  stages = {}
  for name, path in sources.items():
    variables = (ctx.checkpoints[name] if name in ctx.checkpoints else
                 load_checkpoint(path, ctx.abstract_variables, f'eval_only: stage {name!r}'))
    stages[name] = pretrained(ctx, variables, path, name)[1][-1]
  results = {'stages': {n: {k: m[k] for k in METRICS} for n, m in stages.items()},
             'checkpoints': sources}
  write_json(os.path.join(workdir, 'eval.json'), results)
  log(format_table(results['stages']))
  return results


def write_json(path: str, content: dict) -> None:
  """Writes atomically (a temporary file renamed over the target); NaN is refused."""
  if jax.process_index() != 0:
    return
  text = json.dumps(content, indent=1, default=str, allow_nan=False)  # before any file is opened
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def format_table(stages: dict) -> str:
  lines = [f'{"stage":<12}{"acc":>9}{"acc_nontarget":>15}{"asr":>9}']
  for name, m in stages.items():
    lines.append(f'{name:<12}{m["acc"]:>9.2f}{m["acc_nontarget"]:>15.2f}{m["asr"]:>9.2f}')
  return '\n'.join(lines)
