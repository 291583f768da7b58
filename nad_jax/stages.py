"""The stage library: what every stage shares, and training, resuming, loading and
evaluating one stage.

A stage trains one model (the backdoored victim, the teacher, a defense) under
its own orbax CheckpointManager in `workdir/<stage>`. Rerunning the same command
skips a finished stage and resumes an interrupted one from its last saved epoch;
without a workdir (the Python API) a stage keeps no checkpoints. Defenses
(`nad_jax.defenses`) and runners (`nad_jax.experiments`) are built from these.
"""

import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from nad_jax import attacks as attacks_lib
from nad_jax import backdoorbench
from nad_jax import checkpoint as ckpt_lib
from nad_jax import data as data_lib
from nad_jax import models
from nad_jax import streams
from nad_jax import torch_io
from nad_jax import train as train_lib
from nad_jax import validation
from nad_jax.kernels import onednn

# A finished stage's speeds, in its folder: a run that restores it reports them.
STAGE_TIMING = 'timing.json'
SECTIONS = validation.SECTIONS
ConfigError = validation.ConfigError
METRICS = ('acc', 'acc_nontarget', 'asr', 'ra')
LOADABLE = validation.LOADABLE
PREPARED = 'prepared_training_set.npz'


class Context(NamedTuple):
  """What every stage shares: model, data on the devices, attack and evaluation.

  With `config.seeds` every seed-dependent field (`poisoned`, and what `clean_data`,
  `init_variables` and the stages draw) holds K replicas along a leading axis.
  """
  config: Any
  workdir: str | None  # None: stages keep no checkpoints
  model: Any
  mesh: Any
  normalize: Any
  attack: attacks_lib.Attack
  dataset: data_lib.Dataset
  poisoned: np.ndarray  # (N,) or (K, N) bool: the training images the attack poisons
  test_set: train_lib.TestSet
  evaluate: Any
  abstract_variables: Any
  checkpoints: dict  # {'backdoored' | 'teacher': variables} from student/teacher.checkpoint
  data_digest: str  # validation.data_digest of `dataset`
  contents: dict  # {path field: digest of the model or files it names} (stage_fields)


class StageResult(NamedTuple):
  """What a stage (or a defense) returns.

  Attributes:
    variables: the model's {'params', 'batch_stats'}, on the devices.
    history: one dict per evaluated or trained epoch: 'epoch' (0: before training),
      'ce' and, when distilling, 'at' (per layer) for trained epochs, and the
      METRICS (percent) where the epoch was evaluated; the last entry is evaluated.
    timing: {'compile_s', 'img_per_s': per epoch trained in this run, counting every
      replica's images, 'wall_s': seconds from compiling to the last epoch's evaluation,
      'machine': `machine()`} where it trained; for a stage restored from its folder,
      'ran_with' (the run values its folder records, for `trained_with`) and, where it was
      finished (nothing trained now), 'from_earlier_run' with the speeds its folder records
      (STAGE_TIMING); 'resumed_after_epoch' where the run resumed the stage, so that
      'img_per_s' and 'wall_s' cover the epochs after it only; {} for a loaded model.
    info: what a defense adds (fine-pruning's channels, MCR's curve, NAD's teacher).
  """
  variables: Any
  history: list
  timing: dict
  info: dict = {}

  @property
  def metrics(self) -> dict:
    """The METRICS of the last evaluation (with `config.seeds`, a list: one per seed)."""
    return {k: self.history[-1][k] for k in METRICS}


# ------------------------------------------------------------------------------- seeds

def replicas(config) -> bool:
  """Whether the run trains `config.seeds` as stacked replicas (else the one `seed`)."""
  return bool(config.get('seeds'))


def run_seeds(config) -> tuple[int, ...]:
  """The run's seeds: `config.seeds`, or (`config.seed`,)."""
  return tuple(config.seeds) if replicas(config) else (config.seed,)


def per_seed(config, draw: Callable[[int], Any]) -> Any:
  """`draw(seed)` for the run's seed; with `config.seeds`, every seed's draw stacked
  along a new leading axis (numpy arrays stay numpy, jax arrays and keys stay jax).

  Replica s of a K-seed run thus draws exactly what a single run with seed s draws.
  """
  if not replicas(config):
    return draw(config.seed)
  stack = lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)
  return jax.tree.map(stack, *[draw(seed) for seed in config.seeds])


def stage_abstract(ctx: Context) -> Any:
  """The shapes and dtypes of a stage's variables: the model's, with a leading replica
  axis of size K under `config.seeds`."""
  if not replicas(ctx.config):
    return ctx.abstract_variables
  count = len(ctx.config.seeds)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((count, *a.shape), a.dtype),
                      ctx.abstract_variables)


def per_replica(ctx: Context, variables) -> Any:
  """Variables of one model repeated for each replica of a K-seed run; variables that
  already hold K replicas (a K-seed stage folder) as they are."""
  leaf, abstract = jax.tree.leaves(variables)[0], jax.tree.leaves(ctx.abstract_variables)[0]
  if not replicas(ctx.config) or np.ndim(leaf) > len(abstract.shape):
    return variables
  count = len(ctx.config.seeds)
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))),
                      variables)


# -------------------------------------------------------------------------- validation

def validate(config) -> None:
  """validation.RULES, then whether oneDNN can run where it is asked for."""
  validation.validate(config)
  try:
    onednn.resolve(config.model.conv, config.model.dtype)  # says once where 'auto' falls back
  except onednn.OnednnUnavailable as e:
    raise ConfigError(f"model.conv 'onednn': {e}") from None


def clean_count(config, dataset) -> int:
  """How many training images the defender's clean subset holds."""
  return len(data_lib.clean_subset(len(dataset.train_images), config.data.clean_fraction,
                                   config.seed))


# ------------------------------------------------------------------------------ context

def setup(config, workdir: str | None, stages: tuple[str, ...] = validation.TRAINED_SECTIONS,
          *, folders: tuple[str, ...] = (), evaluating: bool = False) -> Context:
  """Checks the config, loads the data, builds the attack and model: what stages share.

  Everything a user can get wrong is checked here, before any stage writes: the
  config's rules, the data, the stage folders of `workdir` it will resume, the attack's
  poisoned samples, and the student and teacher checkpoints (opened and checked against
  the model).

  Args:
    config: the run's ConfigDict.
    workdir: where stages checkpoint; None: they keep nothing.
    stages: the config sections that will train (`make_context`).
    folders, evaluating: the stage folders of `workdir` the run resumes or evaluates, and
      whether it only evaluates (`make_context`).

  Raises:
    ConfigError: naming the field, file or folder.
  """
  validate(config)
  where = {'folder': config.data.path, 'tfds': config.data.name}.get(config.data.source,
                                                                       'made in memory')
  log(f'loading the {config.data.source} data ({where})')
  start = time.perf_counter()
  try:
    dataset = data_lib.load_dataset(config.data)
  except data_lib.DataError as e:
    raise ConfigError(str(e)) from None
  log(f'loaded {len(dataset.train_images) + len(dataset.test_images)} images in '
      f'{time.perf_counter() - start:.1f} s')
  return make_context(config, dataset, workdir, stages, folders=folders, evaluating=evaluating)


def make_context(config, dataset: data_lib.Dataset, workdir: str | None,
                 stages: tuple[str, ...] = validation.TRAINED_SECTIONS, *,
                 folders: tuple[str, ...] = (), evaluating: bool = False) -> Context:
  """The Context of a validated config over `dataset` (host arrays).

  Args:
    config: a config that passed `validate`.
    dataset: the data the stages train and evaluate on.
    workdir: where stages checkpoint; None: they keep nothing (the Python API).
    stages: the config sections that will train, whose batch sizes must fit the data.
    folders: the stage folders of `workdir` the run resumes or evaluates, checked
      (`validation.check_workdir`, with the digests of the data and the loaded models)
      before the attack is built.
    evaluating: the run only evaluates (check_workdir's `evaluating`).

  Raises:
    ConfigError: the rules that need the data, a stage folder trained with other values,
      the attack, the checkpoints to load (a BackdoorBench record must agree with the
      config and data: `check_record`). Nothing is written then.
  """
  validation.validate_data(config, dataset.num_classes, len(dataset.train_images),
                           clean_count(config, dataset), dataset.test_labels, stages)
  image_shape = dataset.train_images.shape[1:]
  paths = {stage: validation.lookup(config, field) for stage, field in LOADABLE.items()
           if validation.lookup(config, field)}
  records = {stage: read_record(path, LOADABLE[stage]) for stage, path in paths.items()
             if is_record(path)}
  for stage, record in records.items():  # before the attack, which may read the record too
    check_record(config, record, image_shape, dataset.num_classes, LOADABLE[stage])
  model = models.build_model(config.model.name, dataset.num_classes, config.model.dtype,
                             config.model.conv)
  mesh = train_lib.make_mesh()
  normalize = train_lib.normalizer(config.model.mean, config.model.std)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                               train=False, mutable=True))
  sown = tuple(abstract.pop('intermediates', {}))
  unknown = [layer for layer in validation.distill_layers(config) if layer not in sown]
  if unknown:
    raise ConfigError(f'nad.layers {unknown} are not sown by {config.model.name}; '
                      f'choose from {sown}')
  loaded = {stage: (record_variables(records[stage], abstract, LOADABLE[stage])
                    if stage in records else load_checkpoint(path, abstract, LOADABLE[stage]))
            for stage, path in paths.items()}
  digest = validation.data_digest(dataset)
  # the loaded models by their weights, the attack's files by their bytes: another model or
  # file at the same path is another run
  contents = {**{LOADABLE[stage]: validation.variables_digest(variables)
                 for stage, variables in loaded.items()},
              **validation.attack_file_digests(config)}
  if workdir is not None:
    validation.check_workdir(config, workdir, folders, digest, evaluating, contents=contents)
  memo = AttackMemo(workdir, config.attack, digest, contents)
  try:
    attack = attacks_lib.build_attack(config.attack, dataset.num_classes,
                                      dataset.train_images.shape[1:], dataset, fit=fit_logged,
                                      memo=memo)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  poisoned = per_seed(config, lambda seed: attacks_lib.poison_mask(
      dataset.train_labels, attack, config.attack.poison_rate,
      streams.rng(seed, 'poisoned_indices')))
  if not config.student.checkpoint:
    labels = dataset.train_labels
    candidates = (int(np.sum(np.asarray(attack.relabel(labels)) == labels))
                  if attack.clean_label else len(labels))
    validation.validate_poisoning(config, poisoned_count(poisoned), candidates)
  test_set = train_lib.make_test_set(dataset.test_images, dataset.test_labels,
                                     config.data.eval_batch_size, mesh, attack)
  evaluate_fn = train_lib.make_evaluate(model, mesh, normalize, attack, config.get('scan_epoch'),
                                        replicas=replicas(config))
  memo.save()
  return Context(config, workdir, model, mesh, normalize, attack, dataset, poisoned, test_set,
                 evaluate_fn, abstract, loaded, digest, contents)


class AttackMemo:
  """The `memo` of `attacks.build_attack`: what an attack's build chose (Refool's selected
  reflections) is kept with the attack config and the data it was chosen for, and returned
  again for the same ones, so a resumed, rerun or evaluation-only run, or the Python API's
  next call, does not choose again (Refool's selection trains a model per round).

  With a workdir the choice is kept in `workdir/<name>.json`; without one (the Python API),
  in this process's memory. A new choice is kept by `save`, once the run's other checks
  have passed, so a run refused after the attack's build leaves no file.
  """

  # {(name, key as JSON): value}: the choices of builds without a workdir, in this process.
  in_process: dict = {}

  def __init__(self, workdir: str | None, attack_cfg, data_digest: str,
               contents: dict | None = None):
    """Args: workdir: the run's folder, or None to keep choices in this process's memory;
    attack_cfg: `config.attack`; data_digest: `validation.data_digest` of the dataset;
    contents: the digests of the files the attack's path fields name
    (`validation.attack_file_digests`), so that other files at the same path choose again."""
    self.workdir = workdir
    files = {f: d for f, d in (contents or {}).items() if f in validation.ATTACK_FILE_FIELDS}
    self.key = json.loads(json.dumps({'attack': attack_cfg.to_dict(), 'data.digest': data_digest,
                                      **({'files': files} if files else {})}, default=str))
    self.chosen = {}  # {name: value} chosen by this build, not yet kept
    self.key_text = json.dumps(self.key, sort_keys=True)  # the in-process memo's key

  def __call__(self, name: str, compute):
    """What `compute()` (JSON-serialisable: lists, dicts, numbers) returned for this
    attack config and data, kept or computed now."""
    kept = self._kept(name)
    if kept is not None:
      return kept
    self.chosen[name] = compute()
    return self.chosen[name]

  def _kept(self, name: str):
    """The value kept for `name` and this key, or None."""
    if self.workdir is None:
      kept = AttackMemo.in_process.get((name, self.key_text))
      if kept is not None:
        log(f'{name}: kept from an earlier call in this process')
      return copy.deepcopy(kept)  # the caller's to change
    path = os.path.join(self.workdir, f'{name}.json')
    try:
      with open(path) as f:
        saved = json.load(f)
      if saved['key'] == self.key:
        log(f'{name}: kept from {path}')
        return saved['value']
    except (OSError, ValueError, KeyError, TypeError):
      pass  # none kept yet, or an unreadable file: choose again
    return None

  def save(self) -> None:
    """Keeps the choices made since the last `save`."""
    for name, value in self.chosen.items():
      if self.workdir is None:
        AttackMemo.in_process[(name, self.key_text)] = copy.deepcopy(value)
      else:
        write_json(os.path.join(self.workdir, f'{name}.json'), {'key': self.key, 'value': value})
    self.chosen = {}


def poisoned_count(poisoned: np.ndarray) -> int:
  """How many training images one replica poisons (every replica poisons as many)."""
  return int(np.reshape(poisoned, (-1, poisoned.shape[-1]))[0].sum())


def clean_data(ctx: Context):
  """The defender's clean subset: (images, labels, an all-False poisoned mask); with
  `config.seeds`, each seed's subset stacked ((K, n, H, W, C), (K, n), (K, n))."""
  ds, config = ctx.dataset, ctx.config

  def subset(seed):
    clean = data_lib.clean_subset(len(ds.train_images), config.data.clean_fraction, seed)
    return ds.train_images[clean], ds.train_labels[clean], np.zeros(len(clean), bool)
  return per_seed(config, subset)


def init_variables(ctx: Context, stream: str) -> dict:
  """A fresh initialisation of the model from the random stream `stream` (per seed)."""
  shape = tuple(ctx.dataset.train_images.shape[1:])
  return per_seed(ctx.config, lambda seed: models.initialize(ctx.model, streams.key(seed, stream),
                                                             shape))


# ------------------------------------------------------------------------------ stages

def log(message: str) -> None:
  """Prints `message` on process 0 only, above any progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def progress(total: int, initial: int, desc: str, unit: str) -> tqdm.tqdm:
  """A progress bar on stderr, shown on process 0 where stderr is a terminal (tqdm's
  disable=None); elsewhere (logs, tests) the per-epoch lines report progress alone."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                   dynamic_ncols=True, disable=None if jax.process_index() == 0 else True)


def fit_logged(model, cfg, images: np.ndarray, labels: np.ndarray, key: jax.Array) -> dict:
  """`train.fit` printing one line per epoch: an attack's surrogate (CL's, Refool's
  selection rounds) trains for minutes before any stage prints."""
  images_per_epoch = len(images) // cfg.batch_size * cfg.batch_size
  def report(epoch: int, ce: float, seconds: float) -> None:
    log(f'[surrogate] epoch {epoch}/{cfg.epochs}  ce {ce:.4f}  '
        f'({images_per_epoch / seconds:.0f} img/s)')
  return train_lib.fit(model, cfg, images, labels, key, on_epoch=report)


def evaluate(ctx: Context, variables) -> dict:
  """The METRICS of `variables` on the test set, in percent rounded to 4 decimals (with
  `config.seeds`, a list of one value per seed)."""
  # The same trigger draws at every evaluation.
  key = per_seed(ctx.config, lambda seed: streams.key(seed, 'evaluation'))
  metrics = jax.device_get(ctx.evaluate(variables, ctx.test_set, key))
  return {k: rounded(v, 4) for k, v in metrics.items()}


def evaluate_first(ctx: Context, variables, name: str) -> dict:
  """`evaluate` before a stage trains, saying so and how long it took: the first evaluation
  also compiles (CIFAR-10's test set: 12-16 s on 2 CPU cores, longer on slower machines)."""
  log(f'[{name}] evaluating on the {len(ctx.dataset.test_labels)} test images, clean and '
      'triggered')
  start = time.perf_counter()
  metrics = evaluate(ctx, variables)
  log(f'[{name}] evaluated in {time.perf_counter() - start:.1f} s')
  return metrics


def rounded(value, digits: int):
  """A float, or nested lists of floats for an array, rounded to `digits` decimals."""
  if np.ndim(value) == 0:
    return round(float(value), digits)
  return [rounded(v, digits) for v in value]


def mean(value) -> float:
  """The mean over replicas of a recorded figure (the figure itself for one seed)."""
  return float(np.mean(value))


def shown(value) -> str:
  """A recorded figure for a log line: '82.10', or over replicas '82.10±0.52' (mean and
  sample standard deviation)."""
  std = sample_std(value) if np.ndim(value) else None
  return f'{np.mean(value):.2f}' + ('' if std is None else f'±{std:.2f}')


def sample_std(values) -> float | None:
  """The sample standard deviation (ddof 1) over replicas; None for a single one."""
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1)) if values.size > 1 else None


def evaluated_epoch(epoch: int, stage_cfg) -> bool:
  """Whether the stage evaluates and checkpoints after `epoch` (1-based): every
  `eval_every` epochs and after the last. A killed run resumes from the last one."""
  return epoch % stage_cfg.get('eval_every', 1) == 0 or epoch == stage_cfg.epochs


def recipe_for(stage_cfg, distill: tuple = (), layers: tuple = (), p: float = 2.0):
  """The train.Recipe of a stage section: batch size, augmentation, distillation."""
  return train_lib.Recipe(batch_size=stage_cfg.batch_size, crop_flip=stage_cfg.crop_flip,
                          cutout=stage_cfg.cutout, betas=tuple(distill), layers=tuple(layers),
                          p=p)


def open_stage(ctx: Context, name: str, eval_every: int) -> ckpt_lib.StageCheckpoints:
  """The stage's checkpoints in `workdir/name`, with the config fields that shape it
  recorded there before its first epoch (validation.check_workdir reads them) and the
  values of its run (`run_values`, with the stage's `eval_every`)."""
  directory = os.path.join(ctx.workdir, name)
  validation.record_stage(ctx.config, directory, name, ctx.data_digest,
                          run_values(ctx.config, name, eval_every),
                          contents=ctx.contents)
  return ckpt_lib.StageCheckpoints(directory)


def restore_stage(checkpoints: ckpt_lib.StageCheckpoints, name: str, epoch: int, state):
  """(state, history) saved at `epoch`, laid out like `state`; ConfigError if it cannot be."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = checkpoints.restore(epoch, abstract)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'{name}: {e}') from None
  return restored


def train_stage(ctx: Context, name: str, stage_cfg, recipe: train_lib.Recipe, init_variables,
                images, labels, poisoned, attack, frozen=None, stream: str | None = None,
                loss: Callable | None = None, readout: Callable | None = None,
                start_metrics: dict | None = None) -> StageResult:
  """Trains (or resumes) one stage with the engine's TrainEpoch.

  Args:
    ctx: the shared Context.
    name: the stage's name and folder (`workdir/name`).
    stage_cfg: its config section (epochs, batch_size, optimiser, eval_every).
    recipe: batch size, augmentation, distillation.
    init_variables: the variables training starts from.
    images, labels, poisoned: the training set: (N, H, W, C) uint8, (N,) int32, (N,) bool;
      with `config.seeds`, each may hold one set per replica ((K, N, ...); TrainEpoch).
    attack: triggers and relabels the `poisoned` samples; None: no poisoning.
    frozen: what the loss reads but does not train: NAD's teacher, MCR's curve ends.
    stream: the streams name of the batch order and augmentation (default: `name`);
      FT and FP take NAD's, so every defense sees the same batches.
    loss: train.make_loss's signature; None: CE (+ distillation per `recipe`).
    readout: maps the trained variables to the model evaluated (MCR: the curve's
      point); None: the variables themselves.
    start_metrics: the METRICS of `init_variables` where the caller has them (the
      backdoored model's last evaluation): epoch 0 records them instead of evaluating
      the same model again; None: epoch 0 is evaluated.

  Returns:
    StageResult; its variables are the trained ones, before `readout`.

  Raises:
    ConfigError: a checkpoint in `workdir/name` that does not fit.
    FloatingPointError: the loss became non-finite (naming what to lower).
  """
  readout = readout or (lambda variables: variables)
  steps_per_epoch = np.shape(poisoned)[-1] // stage_cfg.batch_size  # (K,) N or N images
  tx = train_lib.make_optimizer(stage_cfg, steps_per_epoch)
  start_state = lambda variables: train_lib.state_from_variables(variables, tx)
  state = (jax.vmap(start_state) if replicas(ctx.config) else start_state)(init_variables)
  state = train_lib.replicate(state, ctx.mesh)
  checkpoints = open_stage(ctx, name, stage_cfg.eval_every) if ctx.workdir is not None else None
  done = checkpoints.latest_epoch() if checkpoints else None
  timing = {'compile_s': 0.0, 'img_per_s': []}
  if done is not None:  # what an earlier run trained, with the values its folder records
    state, history = restore_stage(checkpoints, name, done, state)
    timing['ran_with'] = validation.recorded_values(checkpoints.directory)
    if done >= stage_cfg.epochs:  # finished: this run trains nothing of it
      log(f'[{name}] restored, finished at epoch {done}')
      timing.update(earlier_results(os.path.join(checkpoints.directory, STAGE_TIMING)),
                    from_earlier_run=True)
    else:  # the earlier epochs' speeds went with the interrupted run
      log(f'[{name}] resumed from epoch {done}')
      timing['resumed_after_epoch'] = done
  else:
    first = (start_metrics if start_metrics is not None
             else evaluate_first(ctx, readout(state.variables), name))
    done, history = 0, [{'epoch': 0, **first}]
    if stage_cfg.epochs == 0 and checkpoints:
      # A stage that trains nothing keeps its start, so an evaluation-only rerun finds it.
      checkpoints.save(0, state, history)
  if done < stage_cfg.epochs:
    on_device = train_lib.replicate((images, labels, poisoned), ctx.mesh)
    frozen = frozen if frozen is not None else {}
    run_epoch = train_lib.TrainEpoch(ctx.model, tx, ctx.mesh, recipe, ctx.normalize, attack,
                                     ctx.config.get('scan_epoch'), loss=loss,
                                     replicas=replicas(ctx.config))
    log(f'[{name}] compiling the training step')
    stage_start = start = time.perf_counter()
    compiled = run_epoch.compile(state, frozen, *on_device)
    timing['compile_s'] = round(time.perf_counter() - start, 2)
    log(f'[{name}] compiled in {timing["compile_s"]:.1f} s')
    if replicas(ctx.config):
      check_memory(ctx.config, name, compiled)
    stage_key = per_seed(ctx.config, lambda seed: streams.key(seed, stream or name))
    fold_in = (jax.vmap(jax.random.fold_in, (0, None)) if replicas(ctx.config)
               else jax.random.fold_in)
    distilled = any(recipe.betas)
    with progress(stage_cfg.epochs, done, f'[{name}]', 'epoch') as bar:
      for epoch in range(done, stage_cfg.epochs):
        start = time.perf_counter()
        state, losses = run_epoch(state, frozen, *on_device, fold_in(stage_key, epoch))
        losses = jax.device_get(losses)
        seconds = time.perf_counter() - start
        if not np.all(np.isfinite(losses['ce'])) or (distilled and
                                                     not np.all(np.isfinite(losses['at']))):
          section = SECTIONS.get(name, name)
          raise FloatingPointError(
              f'{name}: the loss became non-finite in epoch {epoch + 1} (ce {losses["ce"]}'
              + (f', AT per layer {losses["at"].tolist()}; lower nad.betas '
                 f'{tuple(recipe.betas)} or {section}.learning_rate, or check nad.p {recipe.p}'
                 if distilled else f'; lower {section}.learning_rate') + ')')
        speed = len(run_seeds(ctx.config)) * steps_per_epoch * stage_cfg.batch_size / seconds
        timing['img_per_s'].append(round(speed, 1))
        entry = {'epoch': epoch + 1, 'ce': rounded(losses['ce'], 5)}
        message = f'[{name}] epoch {epoch + 1}/{stage_cfg.epochs}  ce {mean(entry["ce"]):.4f}'
        if distilled:  # with every beta 0 the AT term is not computed, so not recorded
          entry['at'] = rounded(losses['at'], 7)
          weighted = np.sum(np.asarray(recipe.betas) * losses['at'], axis=-1)
          message += f'  at {mean(weighted):.4f}'
        evaluated = evaluated_epoch(epoch + 1, stage_cfg)
        if evaluated:
          entry.update(evaluate(ctx, readout(state.variables)))
          message += ''.join(f'  {k} {shown(entry[k])}' for k in METRICS)
        history.append(entry)
        log(f'{message}  ({speed:.0f} img/s)')
        if evaluated and checkpoints:
          checkpoints.save(epoch + 1, state, history)
        bar.update(1)
    timing.update(wall_s=round(time.perf_counter() - stage_start, 1), machine=machine())
    if checkpoints:  # finished: its speeds stay with it, for the runs that restore it
      write_json(os.path.join(checkpoints.directory, STAGE_TIMING),
                 {k: v for k, v in timing.items() if k != 'ran_with'})
  if checkpoints:
    checkpoints.close()
  return StageResult(state.variables, history, timing)


# The CPU features that change a stage's speed here (AVX-512, native bfloat16, AMX): two
# machines sold under one CPU label ("AMD EPYC") may differ in them.
CPU_FEATURES = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')


def machine() -> dict:
  """Where this process computes, as results files record it next to a speed.

  Returns:
    {'cpu': the CPU model (/proc/cpuinfo's 'model name', else platform.processor()),
     'cpu_features': the CPU_FEATURES it has (Linux; [] elsewhere), 'cores': logical CPU
     count, 'backend': JAX's default backend, 'devices': its device count,
     'accelerator': the device kind ('' on CPU)}.
  """
  cpu, flags = platform.processor(), set()
  try:
    with open('/proc/cpuinfo') as f:
      first = f.read().split('\n\n')[0]  # the first CPU's block
    info = dict((key.strip(), value.strip()) for key, value in
                (line.split(':', 1) for line in first.splitlines() if ':' in line))
    cpu, flags = info.get('model name', cpu), set(info.get('flags', '').split())
  except OSError:
    pass
  backend = jax.default_backend()
  return {'cpu': cpu, 'cpu_features': [f for f in CPU_FEATURES if f in flags],
          'cores': os.cpu_count(), 'backend': backend, 'devices': jax.device_count(),
          'accelerator': '' if backend == 'cpu' else jax.devices()[0].device_kind}


def check_memory(config, name: str, compiled) -> None:
  """Refuses K replicas whose training step needs more memory than a device has free.

  Args:
    config: the run's config (`seeds`).
    name: the stage, for the message.
    compiled: the stage's compiled step (`TrainEpoch.compile`).

  Raises:
    ConfigError: naming `seeds`, the memory the step needs and the memory free.
  """
  needed, free = memory_needed(compiled), device_memory_free()
  if needed is None or free is None:
    return
  if needed > free:
    count = len(config.seeds)
    gib = lambda n: f'{n / 2**30:.1f} GiB'
    raise ConfigError(f'seeds: {count} replicas of stage {name!r} need {gib(needed)} on a '
                      f'device ({gib(needed / count)} a replica) but {gib(free)} is free; '
                      'run fewer seeds at once or lower the batch size')


def memory_needed(compiled) -> int | None:
  """Bytes a compiled step needs on a device by XLA's memory analysis: its arguments,
  outputs (less the donated ones that reuse their arguments' buffers) and temporaries;
  None where the backend gives no analysis."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_memory_free() -> int | None:
  """Bytes free on the first local device: the accelerator's allocator limit less what
  is in use, or on CPU the host's available memory; None where unknown."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError):
    return None


def is_record(path: str) -> bool:
  """Whether `path` is a BackdoorBench record: a folder holding attack_result.pt, or
  that file (by its name; any other file is read as a PyTorch state_dict)."""
  return (os.path.isfile(os.path.join(path, backdoorbench.RESULT_FILE))
          or (os.path.isfile(path) and os.path.basename(path) == backdoorbench.RESULT_FILE))


def read_record(path: str, field: str) -> backdoorbench.Record:
  """`backdoorbench.read_record`, its errors as a ConfigError naming `field`."""
  try:
    return backdoorbench.read_record(path)
  except backdoorbench.RecordError as e:
    raise ConfigError(f'{field}: {e}') from None


def check_record(config, record: backdoorbench.Record, image_shape, num_classes: int,
                 field: str) -> None:
  """Refuses a run whose model differs from the BackdoorBench record it loads.

  The record fixes the architecture, the input scaling (BackdoorBench's
  normalisation of its clean_data) and the class count; the config must state the
  same (`model.name`, `model.mean`, `model.std`) and the data must have the
  record's classes and image size. nad-jax does not silently replace config
  values: the results' config is the one that ran. nad-jax-clean sets them from
  the record.

  Args:
    config: the run's config.
    record: the record `field` names.
    image_shape: (H, W, C) of the dataset's images.
    num_classes: the dataset's class count.
    field: 'student.checkpoint' or 'teacher.checkpoint', for the message.

  Raises:
    ConfigError: one line naming every field that disagrees and the record's value.
  """
  def scaling(values):
    return None if values is None else tuple(round(float(v), 6) for v in values)

  conflicts = []
  if config.model.name != record.model_name:
    conflicts.append(f'model.name {config.model.name!r} (the record: {record.model_name!r})')
  for name, ours, theirs in (('mean', config.model.mean, record.mean),
                             ('std', config.model.std, record.std)):
    if scaling(ours) != scaling(theirs):
      conflicts.append(f'model.{name} {scaling(ours)} (the record: {scaling(theirs)}, '
                       f'BackdoorBench\'s normalisation of {record.dataset!r})')
  if num_classes != record.num_classes:
    conflicts.append(f'the data has {num_classes} classes (the record: {record.num_classes})')
  if tuple(image_shape) != record.image_shape:
    conflicts.append(f'the data\'s images are {"x".join(map(str, image_shape))} (the '
                     f'record\'s: {"x".join(map(str, record.image_shape))})')
  if conflicts:
    raise ConfigError(f'{field} {record.path} is a BackdoorBench record that the run does not '
                      'match: ' + '; '.join(conflicts) + ". Set the record's values")


def record_variables(record: backdoorbench.Record, abstract_variables, field: str) -> dict:
  """A record's model variables, checked against the configured model's."""
  problems = ckpt_lib.mismatches(record.variables, abstract_variables)
  if problems:
    raise ConfigError(f'{field}: the model of the BackdoorBench record {record.path} does not '
                      f'fit the configured model: {problems}')
  return record.variables


def load_checkpoint(path: str, abstract_variables, field: str) -> dict:
  """Variables from a BackdoorBench record, a PyTorch file (whatever its name) or a
  nad-jax stage folder.

  A record is loaded as it is: `make_context` also checks it against the config
  (`check_record`).

  Args:
    path: the record (folder or attack_result.pt), the file or the stage folder.
    abstract_variables: the model's {'params', 'batch_stats'} shapes and dtypes.
    field: the config field that named `path`, for the message.

  Returns:
    Host variables shaped like `abstract_variables`.

  Raises:
    ConfigError: one line naming `field` and `path`: missing, unreadable, or not this model.
  """
  if is_record(path):
    return record_variables(read_record(path, field), abstract_variables, field)
  try:
    if os.path.isfile(path):
      return torch_io.load(path, abstract_variables)
    if os.path.isdir(path):
      return ckpt_lib.load_variables(path, abstract_variables)
    raise ckpt_lib.CheckpointError(f'{path} does not exist')
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'{field}: {e}') from None


def pretrained(ctx: Context, variables, path: str, name: str) -> StageResult:
  """Loaded variables (one model, repeated for each seed), evaluated once, as a stage
  that trained nothing."""
  variables = train_lib.replicate(per_replica(ctx, variables), ctx.mesh)
  log(f'[{name}] loaded {path}')
  return StageResult(variables, [{'epoch': 0, 'checkpoint': path,
                                  **evaluate_first(ctx, variables, name)}], {})


def finished(directory: str, epochs: int) -> bool:
  """Whether the stage folder holds its last epoch's checkpoint."""
  return max(ckpt_lib.finished_epochs(directory), default=-1) >= epochs


def evaluation_sources(config, workdir: str, names, what: str = '') -> dict:
  """The checkpoint an evaluation-only run restores for each stage, checked before any
  data is loaded or anything is written.

  A stage is restored from the file or record that `student.checkpoint` /
  `teacher.checkpoint` names (LOADABLE), else from its folder in `workdir`, which must
  hold the stage's last epoch: an interrupted stage's latest epoch is not its result.

  Args:
    config: the run's config; a stage's epoch count is `<section>.epochs` (SECTIONS).
    workdir: the folder holding the stage folders.
    names: the stages to restore.
    what: appended to the stage's name in messages (e.g. " of attack 'blend'").

  Returns:
    {stage: path}, in the order of `names`.

  Raises:
    ConfigError: a stage without a checkpoint, or whose folder stops before its last epoch.
  """
  sources = {}
  for name in names:
    path = (validation.lookup(config, LOADABLE[name]) if name in LOADABLE else '') or \
        os.path.join(workdir, name)
    if not os.path.exists(path):  # a stage folder, or a file or record
      raise ConfigError(f'eval_only: no checkpoint for stage {name!r}{what} at {path}; run '
                        'without --config.eval_only first')
    epochs = validation.lookup(config, f'{SECTIONS.get(name, name)}.epochs')
    if path == os.path.join(workdir, name) and not finished(path, epochs):
      last = max(ckpt_lib.finished_epochs(path), default=None)
      raise ConfigError(
          f'eval_only: stage {name!r}{what} in {path} is unfinished ('
          + ('no epoch saved' if last is None else f'epoch {last} of {epochs} saved')
          + '); rerun without --config.eval_only to finish it')
    sources[name] = path
  return sources


def victim_set(ctx: Context, directory: str | None):
  """The training set the victim trains on, after `Attack.prepare` (e.g. CL's surrogate
  training and PGD). It is kept in the stage folder until the stage finishes, so a
  resumed stage reuses it instead of preparing it again."""
  ds = ctx.dataset
  if ctx.attack.prepare is None:
    return ds.train_images, ds.train_labels, ctx.poisoned
  poisoned = list(np.reshape(ctx.poisoned, (-1, ctx.poisoned.shape[-1])))

  def prepare_seed(seed):
    log(f'[backdoored] preparing the {ctx.attack.name} training set of seed {seed} (the '
        'attack works on its poisoned images before training; this can take minutes)')
    start = time.perf_counter()
    prepared = attacks_lib.prepare(ctx.attack, ds.train_images, ds.train_labels,
                                   poisoned[run_seeds(ctx.config).index(seed)],
                                   streams.key(seed, 'attack_prepare'))
    log(f'[backdoored] prepared in {time.perf_counter() - start:.1f} s')
    return prepared
  prepare = lambda: per_seed(ctx.config, prepare_seed)
  if directory is None:
    return prepare()
  path = os.path.join(directory, PREPARED)
  if os.path.isfile(path):
    with np.load(path) as saved:
      log(f'[backdoored] reusing the prepared training set in {path}')
      return saved['images'], saved['labels'], saved['poisoned']
  prepared = prepare()
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, images=prepared[0], labels=prepared[1], poisoned=prepared[2])
    os.replace(tmp, path)
  return prepared


def backdoored(ctx: Context) -> StageResult:
  """`student.checkpoint`, or the model trained under the attack (`backdoor_training`).

  A finished stage is restored without preparing the attack again.
  """
  ds, config = ctx.dataset, ctx.config
  given = 'backdoored' in ctx.checkpoints  # no training set is poisoned then
  log(f'{len(ds.train_images)} training images'
      + ('' if given else f' ({poisoned_count(ctx.poisoned)} poisoned by {ctx.attack.name})')
      + f', {clean_count(config, ds)} clean for the defense, {len(ds.test_images)} test; '
      f'{jax.device_count()} {jax.default_backend()} device(s)')
  if given:
    return pretrained(ctx, ctx.checkpoints['backdoored'], config.student.checkpoint,
                      'backdoored')
  directory = ctx.workdir and os.path.join(ctx.workdir, 'backdoored')
  if directory and finished(directory, config.backdoor_training.epochs):
    training_set = ds.train_images, ds.train_labels, ctx.poisoned  # nothing left to train
  else:
    training_set = victim_set(ctx, directory)
  result = train_stage(ctx, 'backdoored', config.backdoor_training,
                       recipe_for(config.backdoor_training), init_variables(ctx, 'victim_init'),
                       *training_set, ctx.attack)
  if directory and jax.process_index() == 0 and os.path.isfile(os.path.join(directory, PREPARED)):
    os.remove(os.path.join(directory, PREPARED))
  return result


# ------------------------------------------------------------------------------ outputs

def earlier_results(path: str) -> dict:
  """The results file at `path` as a dict; {} where there is none (a first run) or it
  cannot be read."""
  try:
    with open(path) as f:
      content = json.load(f)
  except (OSError, ValueError):
    return {}
  return content if isinstance(content, dict) else {}


def kept_timing(earlier: dict, timing: dict) -> dict:
  """`timing` ({stage: StageResult.timing}), where a stage was restored finished (marked
  `from_earlier_run` by train_stage) from a folder older than STAGE_TIMING files, given the
  speeds that `earlier` (the same mapping, as a results file recorded it) has for it."""
  def kept(name, entry):
    if not entry.get('from_earlier_run') or entry.get('img_per_s'):
      return entry
    measured = {k: v for k, v in earlier.get(name, {}).items()
                if k not in ('from_earlier_run', 'trained_with')}
    return {**entry, **measured}
  return {name: kept(name, entry) for name, entry in timing.items()}


# Fields that shape no stage's weights yet belong to how its run computed and evaluated it.
RUN_FIELDS = ('model.conv', 'data.eval_batch_size')


def run_fields(name: str) -> tuple[str, ...]:
  """RUN_FIELDS and stage `name`'s eval_every field (dotted)."""
  return RUN_FIELDS + (f'{SECTIONS.get(name, name)}.eval_every',)


def run_values(config, name: str, eval_every: int) -> dict:
  """{dotted field: value} of `run_fields(name)`: RUN_FIELDS in `config`, `eval_every`."""
  return {**{f: validation.lookup(config, f) for f in RUN_FIELDS},
          run_fields(name)[-1]: eval_every}


def trained_with(timing: dict, config: dict, earlier_config: dict | None = None) -> dict:
  """`timing` where each restored stage ran with other RUN_FIELDS values or eval_every
  than `config` (this run's, which the results file records): its `ran_with` (what its
  folder records, train_stage) becomes `trained_with`, those fields and the values its run
  had; dropped where none differs.

  check_workdir refuses a restored stage whose shaping fields changed; these may change.

  Args:
    timing: {stage: StageResult.timing}.
    config: this run's config (a dict).
    earlier_config: the config the earlier results file records (a dict), for a folder
      written before folders recorded `ran_with`.

  Returns:
    The mapping, entries copied.
  """
  now, before = validation.flatten(config), validation.flatten(earlier_config or {})
  marked = {}
  for name, entry in timing.items():
    entry = dict(entry)
    ran = entry.pop('ran_with', None)
    if ran == {} and entry.get('from_earlier_run'):  # an older folder: the earlier run's
      ran = {f: before[f] for f in run_fields(name) if f in before}
    differs = {f: v for f, v in (ran or {}).items() if now.get(f) != v}
    marked[name] = {**entry, **({'trained_with': differs} if differs else {})}
  return marked


def trained_now(timings) -> bool:
  """Whether any of `timings` (StageResult.timing dicts) trained an epoch in this run."""
  return any(t.get('img_per_s') and not t.get('from_earlier_run') for t in timings)


def remove_stale(path: str, trained: bool) -> None:
  """Removes the evaluation-only results at `path` where this run `trained` a stage: they
  describe the models before it."""
  if trained and jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)
    log(f'removed {path}: it evaluated the models before this run trained them again')


def remove_unwritten(directory: str, earlier: list, written: list) -> None:
  """Removes the files an earlier run listed as its outputs (`earlier`, paths relative to
  `directory`) that this run did not write again (`written`): a report, figure or
  BackdoorBench result of another method or setting would sit beside this run's as if it
  were one of them."""
  if jax.process_index() != 0:
    return
  for name in sorted(set(earlier) - set(written)):
    path = os.path.join(directory, name)
    if os.path.isfile(path) and not os.path.relpath(path, directory).startswith('..'):
      os.remove(path)
      log(f'removed {path}: an earlier run wrote it, this one does not')


def write_json(path: str, content: dict) -> None:
  """Writes atomically (a temporary file renamed over the target) on process 0; NaN is
  refused (ValueError) before any file is opened."""
  if jax.process_index() != 0:
    return
  text = json.dumps(content, indent=1, default=str, allow_nan=False)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def summarize(config, metrics: dict) -> dict:
  """The figures a results file opens with.

  Args:
    config: the run's config.
    metrics: {stage: StageResult.metrics}; under `config.seeds` each value is a list
      with one entry per seed.

  Returns:
    {'stages': {stage: {metric: value}}}; under `config.seeds` the value is the mean
    over seeds, and the dict also holds 'seeds', 'std' ({stage: {metric: sample
    standard deviation (ddof 1), None for one seed}}) and 'per_seed' ({seed:
    {stage: {metric: value}}}).
  """
  if not replicas(config):
    return {'stages': metrics}
  return {
      'seeds': list(config.seeds),
      'stages': {name: {k: round(mean(v), 4) for k, v in m.items()} for name, m in metrics.items()},
      'std': {name: {k: None if sample_std(v) is None else round(sample_std(v), 4)
                     for k, v in m.items()} for name, m in metrics.items()},
      'per_seed': {str(seed): {name: {k: v[i] for k, v in m.items()}
                               for name, m in metrics.items()}
                   for i, seed in enumerate(config.seeds)},
  }


def format_table(stages: dict, std: dict | None = None) -> str:
  """A text table of {stage: metrics}, one row a stage; with `std` (`summarize`'s),
  each cell is mean±std."""
  cell = lambda name, k: (f'{stages[name][k]:.2f}' if not std or std[name][k] is None
                          else f'{stages[name][k]:.2f}±{std[name][k]:.2f}')
  width = {k: max(9, len(k) + 2, *(len(cell(name, k)) + 2 for name in stages)) for k in METRICS}
  lines = [f'{"stage":<12}' + ''.join(f'{k:>{width[k]}}' for k in METRICS)]
  for name in stages:
    lines.append(f'{name:<12}' + ''.join(f'{cell(name, k):>{width[k]}}' for k in METRICS))
  return '\n'.join(lines)
