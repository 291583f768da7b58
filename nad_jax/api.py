"""nad-jax from Python: arrays and variables in, variables and a per-epoch history out.

Images are uint8 NHWC arrays in [0, 255] and labels int arrays, held in a `Dataset`
(`nad_jax.Dataset(train_images, train_labels, test_images, test_labels, num_classes)`,
or `load_data`). Each function trains or evaluates on the devices JAX sees and writes
nothing to disk. Options are keyword arguments with the paper's defaults
(`nad_jax.defaults.paper_config`); `config=` takes a whole ConfigDict instead, and the
keyword arguments given override it. A keyword argument that the called function would
not read (e.g. `clean_fraction` for `evaluate`) is refused, naming who reads it.

    import nad_jax
    data = nad_jax.load_data('synthetic', train_size=5000, test_size=1000)
    backdoored = nad_jax.train_backdoored(data, attack='badnets', epochs=5,
                                          learning_rate=0.05)
    erased = nad_jax.erase(data, backdoored.variables, method='nad')
    print(nad_jax.evaluate(data, erased.variables))  # {'acc': .., 'acc_nontarget': .., 'asr': .., 'ra': ..}
"""

import copy
import difflib
from typing import Any, NamedTuple

import jax
import ml_collections

from nad_jax import attacks
from nad_jax import checkpoint as ckpt_lib
from nad_jax import data as data_lib
from nad_jax import defaults
from nad_jax import stages
from nad_jax import train as train_lib
from nad_jax import validation
from nad_jax import defenses
from nad_jax.defenses import nad as nad_lib

METHODS = ('nad', 'ft', 'fp', 'mcr')
# The keyword options of the functions below, for suggestions on a misspelt one.
KEYWORDS = ('model', 'seed', 'attack', 'target_label', 'poison_rate', 'clean_fraction', 'epochs',
            'batch_size', 'learning_rate', 'lr_boundaries', 'betas', 'teacher', 'teacher_epochs',
            'method', 'config')


class Result(NamedTuple):
  """What a training function returns: what `main.py` writes to results.json for a stage.

  variables: {'params', 'batch_stats'} of the trained model, numpy arrays on the host.
  history: one dict per epoch (epoch 0: before training): 'ce' (and 'at', the AT loss
    per distilled layer, for NAD), and 'acc', 'acc_nontarget', 'asr', 'ra' in percent.
  info: what the defense adds: NAD's teacher ({'teacher': Result}: trained, or loaded from
    teacher.checkpoint and evaluated), fine-pruning's channels and plan, MCR's curve
    ({'t', 'curve'}); {} otherwise.
  attack: what building the attack measured (Refool's `selection_rounds`); {} otherwise.
  """
  variables: dict
  history: list
  info: dict = {}
  attack: dict = {}


def make_config(config: ml_collections.ConfigDict | None = None, *, model: str | None = None,
                seed: int | None = None, attack: str | None = None,
                target_label: int | None = None, poison_rate: float | None = None,
                clean_fraction: float | None = None, **stages) -> ml_collections.ConfigDict:
  """`config` (default: the paper's) with the given options set.

  Args:
    config: a ConfigDict shaped like `defaults.paper_config()`; copied with its
      references (a later `nad.epochs` still reaches a following `fp`), not changed.
    model: `model.name`, e.g. 'wrn16_1', 'preact_resnet18', 'tiny'.
    seed: `seed`, from which every random choice is derived.
    attack: an attack variant (defaults.ATTACK_VARIANTS: 'badnets', 'all2all', 'blend',
      'sig', ...), which sets its fields over `config`'s as `configs/*.py:ATTACK` does
      (name, mode; a clean-label one poisons 80% of the target class; CL's surrogate is
      WRN-16-1: defaults.set_attack), or another `attack.name` ('files'; nad_jax/attacks).
      Other attack fields: set them on the returned config.
    target_label: `attack.target_label`.
    poison_rate: `attack.poison_rate`, a fraction.
    clean_fraction: `data.clean_fraction`, the defender's share of the training set.
    **stages: a stage's fields, as {section: {field: value}}, e.g.
      nad={'epochs': 5}, teacher={'epochs': 2}.

  Returns:
    A new ConfigDict; it is checked by `validation.validate` when used.

  Raises:
    ConfigError: `config` is not a ConfigDict, an option is unknown or takes no part in
      this call, or a value is not of its field's type (the message names the field).
  """
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    raise validation.ConfigError(f'config: must be a ConfigDict shaped like '
                                 f'defaults.paper_config(), not a {type(config).__name__}')
  # A deep copy keeps the given config's references (FP follows `nad`'s schedule); a frozen
  # config has none, and its copy is made to be set.
  config = (ml_collections.ConfigDict(config)
            if isinstance(config, ml_collections.FrozenConfigDict)
            else copy.deepcopy(config or defaults.paper_config()))
  if attack in defaults.ATTACK_VARIANTS:  # the variant's definition, as configs/*.py:ATTACK
    defaults.set_attack(config, attack)
  elif attack is not None:
    _assign(config.attack, 'attack.name', attack)
  for field, value in (('model.name', model), ('seed', seed),
                       ('attack.target_label', target_label),
                       ('attack.poison_rate', poison_rate),
                       ('data.clean_fraction', clean_fraction)):
    if value is not None:
      section, _, leaf = field.rpartition('.')
      _assign(config[section] if section else config, field, value)
  for section, fields in stages.items():
    if section not in config or not isinstance(config[section], ml_collections.ConfigDict):
      if section in KEYWORDS:  # a keyword of another function of this module
        raise validation.ConfigError(f'option {section!r} does not apply to this call')
      if section in config:  # a top-level field, e.g. seeds
        raise validation.ConfigError(
            f'option {section!r}: a field of the config, not a keyword; set config.{section} '
            'in the ConfigDict given as config=')
      raise validation.ConfigError(f'unknown option {section!r}'
                                   f'{_suggest(section, KEYWORDS + tuple(config))}')
    if not isinstance(fields, dict):
      raise validation.ConfigError(f"{section} {fields!r}: must be a dict of its fields, e.g. "
                                   f"{section}={{'epochs': 5}}")
    for field, value in fields.items():
      if field not in config[section]:
        raise validation.ConfigError(f'unknown option {section}.{field}'
                                     f'{_suggest(field, config[section])}')
      _assign(config[section], f'{section}.{field}', value)
  return config


def _assign(section: ml_collections.ConfigDict, name: str, value) -> None:
  """Sets the field `name` (dotted, its last part a field of `section`) to `value`.

  Raises:
    ConfigError: `value` is not of the field's type (ml_collections refuses it).
  """
  field = name.rpartition('.')[2]
  try:
    section[field] = value
  except TypeError:
    expected = section.get_type(field).__name__
    raise validation.ConfigError(f'{name} {value!r}: must be of type {expected}, not '
                                 f'{type(value).__name__}') from None


def _suggest(name: str, options) -> str:
  close = difflib.get_close_matches(name, list(options), n=1)
  return f'; did you mean {close[0]!r}?' if close else ''


# `data.*` fields that a dataset does not depend on, and where they are read instead.
NOT_LOADING = {
    'clean_fraction': 'the clean subset is drawn by erase, clean_fraction= there',
    'eval_batch_size': "evaluation's batch: set config.data.eval_batch_size in the config "
                       'given to evaluate, erase or train_backdoored',
}


def load_data(source: str = 'synthetic', *, seed: int = 0, **fields) -> data_lib.Dataset:
  """A dataset as host arrays: 'synthetic', 'tfds' (name=, data_dir=) or 'folder' (path=).

  Args:
    source: `data.source`.
    seed: the synthetic set's seed (`data.seed`).
    **fields: other `data.*` fields (train_size, test_size, num_classes, name, path, ...).

  Returns:
    A Dataset of uint8 (N, H, W, C) images and int32 (N,) labels.

  Raises:
    ConfigError: a field's value is not allowed, a field it does not read (NOT_LOADING),
      or the source cannot be read (the message names the field).
  """
  config = defaults.paper_config()
  for field, value in dict(source=source, seed=seed, **fields).items():
    if field in NOT_LOADING:
      raise validation.ConfigError(f'data.{field} {value!r}: load_data does not read it; '
                                   f'{NOT_LOADING[field]}')
    if field not in config.data:
      raise validation.ConfigError(f'unknown option {field!r} of load_data'
                                   f'{_suggest(field, config.data)}')
    _assign(config.data, f'data.{field}', value)
  validation.validate(config, 'data')
  validation.refuse_unread_fields(config, 'data')  # the paper's defaults, where not given
  try:
    return data_lib.load_dataset(config.data)
  except data_lib.DataError as e:
    raise validation.ConfigError(str(e)) from None


# The make_config keywords that set one field (the others name a section: nad={...}).
KEYWORD_FIELDS = {'model': 'model.name', 'seed': 'seed', 'attack': 'attack.name',
                  'target_label': 'attack.target_label', 'poison_rate': 'attack.poison_rate',
                  'clean_fraction': 'data.clean_fraction'}
# Read only where NAD distils: FT (and MCR's FT end) is NAD with every beta 0.
DISTILLING = ('nad.betas', 'nad.p', 'nad.layers')
CALLS = ('train_backdoored', 'evaluate', 'erase')


def _reads(config, call: str, method: str = 'nad') -> set[str]:
  """The dotted fields of `config` that `call` reads: `_read_by_call`'s, less those
  `validation.unread_fields` names (a loaded stage's recipe, an all-to-all target label)."""
  unread = tuple(validation.unread_fields(config))
  return {field for field in _read_by_call(config, call, method)
          if not validation.lies_in(field, unread)}


def _read_by_call(config, call: str, method: str = 'nad') -> set[str]:
  """The dotted fields of `config` that `call` reads.

  The fields a dataset was loaded with are load_data's; train_backdoored and evaluate draw
  no clean subset. The teacher's fields count as NAD's, which trains one where none is given.

  Args:
    config: the call's config.
    call: one of CALLS.
    method: erase's method.

  Returns:
    The set of dotted field names, e.g. {'seed', 'nad.epochs', ...}.
  """
  def fields(*sections):
    return {f'{s}.{f}' for s in sections for f in config.get(s, {})}

  reads = fields('model', 'attack') | {'data.eval_batch_size'}
  if call == 'train_backdoored':
    return reads | fields('backdoor_training') | {'seed'}
  reads -= set(validation.poisoning_fields(config.attack))
  if call == 'evaluate':  # Refool's test triggers draw from the seed's 'evaluation' stream
    return reads | ({'seed'} if config.attack.name in attacks.DRAWS_PER_IMAGE else set())
  reads |= {'seed', 'data.clean_fraction'}
  if method == 'fp':
    followed = defaults.fp_follows(config) if 'fp' in config else defaults.FP_FOLLOWED
    return reads | fields('fp') | {f'nad.{field}' for field in followed}
  if method == 'nad':
    return reads | fields('nad', 'teacher')
  return (reads | fields('nad', *(('mcr',) if method == 'mcr' else ()))) - set(DISTILLING)


def _readers(config, field: str) -> str:
  """Which functions read `field`, for a message.

  Args:
    config: the call's config.
    field: a dotted field name, e.g. 'fp.acc_drop'.

  Returns:
    e.g. "erase with method 'fp' does", "train_backdoored and erase do".
  """
  readers = [call for call in CALLS[:2] if field in _reads(config, call)]
  methods = [m for m in METHODS if field in _reads(config, 'erase', m)]
  if methods:
    named = ', '.join(map(repr, methods[:-1])) + ' or ' * (len(methods) > 1) + repr(methods[-1])
    readers.append('erase' if len(methods) == len(METHODS) else f'erase with method {named}')
  if field.startswith('data.') and field[5:] not in NOT_LOADING:
    readers = ['load_data']  # the dataset's own fields
  if not readers:
    return f'none of {", ".join(CALLS)} does'
  return ' and '.join(readers) + (' do' if len(readers) > 1 else ' does')


def _refuse_unread(options: dict, config, call: str, method: str = 'nad') -> None:
  """Refuses an option the caller gave that `call` would ignore (a config's fields are not
  checked: a whole config sets fields for every function).

  Args:
    options: make_config's keywords as the caller gave them, already set in `config`.
    config: the call's config.
    call: 'train_backdoored', 'evaluate' or 'erase'.
    method: erase's method.

  Raises:
    ConfigError: naming the option, its value, and the functions that read it.
  """
  reads = _reads(config, call, method)
  unread = validation.unread_fields(config)  # read by no call, with this config
  for option, value in options.items():
    given = ({KEYWORD_FIELDS[option]: value} if option in KEYWORD_FIELDS else
             {f'{option}.{field}': v for field, v in value.items()})
    for field, value in given.items():
      if value is not None and field not in reads:
        name = option if option in KEYWORD_FIELDS else field
        reason = next((why for name, why in unread.items()
                       if validation.lies_in(field, (name,))), None)
        if reason:
          raise validation.ConfigError(f'{name} {value!r}: {reason}')
        where = f'{call} with method {method!r}' if call == 'erase' else call
        why = (' (the model is given: nothing is poisoned)'
               if field in validation.poisoning_fields(config.attack) else
               f" (fp.{field[4:]} has its own value, so FP does not follow NAD's)"
               if method == 'fp' and field[4:] in defaults.FP_FOLLOWED else '')
        raise validation.ConfigError(f'{name} {value!r}: {where} does not read it{why}; '
                                     f'{_readers(config, field)}')


def _context(dataset: data_lib.Dataset, config, trained: tuple[str, ...]) -> stages.Context:
  stages.validate(config)
  if config.student.checkpoint:  # train_backdoored would return it; erase would ignore it
    raise validation.ConfigError(
        f'student.checkpoint {config.student.checkpoint!r}: the Python API takes the '
        'backdoored model as variables (train_backdoored returns them; a PyTorch file loads '
        'with torch_io.load); set student.checkpoint to None')
  if stages.replicas(config):
    raise validation.ConfigError(f'seeds {tuple(config.seeds)}: the Python API trains one seed '
                                 'per call; set seed=, or run main.py with --config.seeds')
  return stages.make_context(config, dataset, workdir=None, stages=trained)


def _on_devices(ctx: stages.Context, variables: dict) -> dict:
  """`variables` on the devices, once checked against the configured model."""
  problems = ckpt_lib.mismatches(variables, ctx.abstract_variables)
  if problems:
    raise validation.ConfigError(f'the variables do not fit model.name '
                                 f'{ctx.config.model.name!r}: {problems}')
  return train_lib.replicate(variables, ctx.mesh)


def _result(result: stages.StageResult, ctx: stages.Context) -> Result:
  """`result` on the host, with its info's StageResults (NAD's teacher) as Results."""
  info = {key: _result(value, ctx) if isinstance(value, stages.StageResult) else value
          for key, value in result.info.items()}
  return Result(jax.device_get(result.variables), result.history, info, ctx.attack.info or {})


def train_backdoored(dataset: data_lib.Dataset, *, config=None, epochs: int | None = None,
                     batch_size: int | None = None, learning_rate: float | None = None,
                     lr_boundaries: tuple | None = None, **options) -> Result:
  """Trains a model from scratch on `dataset`'s training set poisoned by the attack.

  Args:
    dataset: the data; the attack poisons `poison_rate` of its training images.
    config, **options: see `make_config`: model, seed, attack and its fields,
      data.eval_batch_size (not clean_fraction: nothing is cleaned here).
    epochs, batch_size, learning_rate, lr_boundaries: `backdoor_training.*`
      (the official code's: 100 epochs, batch 128, lr 0.1, x0.1 at 50 and 75).

  Returns:
    Result; its history's acc/asr are measured on the test split; its `attack`, Refool's
    selection rounds, where it selects. A selection is made once per process for the same
    attack fields and data: later calls (`erase`, `evaluate`) take it (`stages.AttackMemo`).

  Raises:
    ConfigError: a bad option, or one it does not read (clean_fraction, a defense's
      section), named.
  """
  config = make_config(config, **options)
  _refuse_unread(options, config, 'train_backdoored')
  for field, value in dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                           lr_boundaries=lr_boundaries).items():
    if value is not None:
      _assign(config.backdoor_training, f'backdoor_training.{field}', value)
  ctx = _context(dataset, config, ('backdoor_training',))
  return _result(stages.backdoored(ctx), ctx)


def erase(dataset: data_lib.Dataset, variables: dict, *, method: str = 'nad',
          teacher: dict | None = None, config=None, epochs: int | None = None,
          batch_size: int | None = None, learning_rate: float | None = None,
          lr_boundaries: tuple | None = None, betas: tuple | None = None,
          teacher_epochs: int | None = None, **options) -> Result:
  """Erases the backdoor of `variables` with the defender's clean subset of `dataset`.

  The clean subset is `clean_fraction` (5%) of the training set, drawn from the seed.

  Args:
    dataset: the data; its test split measures acc, acc_nontarget and asr.
    variables: the backdoored model's {'params', 'batch_stats'}.
    method: 'nad' (Li et al., ICLR 2021: CE + attention distillation from a teacher),
      'ft' (fine-tuning: NAD with every beta 0), 'fp' (fine-pruning, Liu et al. 2018) or
      'mcr' (mode connectivity repair, Zhao et al. 2020; its curve ends at the FT model).
    teacher: NAD's teacher variables (method 'nad' only; not with a config's
      `teacher.checkpoint`); None: `teacher.checkpoint`, or else `variables` fine-tuned on
      the clean subset (CE only; `teacher.*`, the paper's 10 epochs, batch 64, lr 0.1 then
      0.01 from epoch 2).
    config, **options: see `make_config`; an option that `method` does not read is
      refused (poison_rate, backdoor_training, another method's section, nad's betas, p
      and layers but for 'nad'; FP reads nad's schedule, which it follows where its own
      field is not given).
    epochs, batch_size, learning_rate, lr_boundaries, betas: the fields of the stage
      that `method` trains. 'nad', 'ft': `nad.*` (the paper's 20 epochs, batch 64, lr
      0.1 then 0.01 from epoch 2, betas 500/1000/1000). 'fp': `fp.*` (unset, FP follows
      NAD's schedule). 'mcr': the curve's `mcr.*` (Zhao et al.'s recipe: 100 epochs of
      10,000 samples, batch 128, lr 0.01; nad_jax/defenses/mcr.py); its FT end keeps
      `nad`'s. betas is refused for 'ft', 'fp' and 'mcr'. Where 'nad' trains its teacher,
      batch_size and learning_rate set `teacher.*` too, as nad-jax-clean's
      --batch-size and --lr do.
    teacher_epochs: `teacher.epochs`, for 'nad' with neither teacher nor
      `teacher.checkpoint` (the one case that trains a teacher); refused otherwise.

  Returns:
    Result of the erased model; its `info`: NAD's teacher ({'teacher': Result}, trained or
    loaded from teacher.checkpoint; none where teacher= is given), FP's pruned channels and
    plan, MCR's curve and t.

  Raises:
    ConfigError: a bad option or method, an option that `method` does not read, or a
      teacher where none is used or two teachers (named).
  """
  if method not in METHODS:
    raise validation.ConfigError(f'method {method!r}: must be one of {METHODS}')
  if betas is not None and method != 'nad':  # FT is NAD with every beta 0
    raise validation.ConfigError(f"betas: NAD's, not a field of method {method!r}")
  if teacher is not None and method != 'nad':
    raise validation.ConfigError(f"teacher: NAD's, method {method!r} has no teacher")
  config = make_config(config)  # a copy, given FP's and MCR's sections for their options
  if 'mcr' not in config:
    defaults.defense_stages(config)
  config = make_config(config, **options)
  if teacher is not None and config.teacher.checkpoint:
    raise validation.ConfigError(
        f'teacher= and teacher.checkpoint {config.teacher.checkpoint!r}: two teachers; drop '
        "teacher= or set the config's teacher.checkpoint to None")
  trains_teacher = method == 'nad' and teacher is None and not config.teacher.checkpoint
  if teacher_epochs is not None and not trains_teacher:
    why = (f"NAD's teacher's, not a field of method {method!r}" if method != 'nad' else
           'the teacher is given (teacher= or teacher.checkpoint), so none is trained')
    raise validation.ConfigError(f'teacher_epochs {teacher_epochs}: {why}')
  stage = {'nad': 'nad', 'ft': 'nad', 'fp': 'fp', 'mcr': 'mcr'}[method]  # what the recipe sets
  recipes = {stage: dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         lr_boundaries=lr_boundaries, betas=betas)}
  if trains_teacher:  # one meaning everywhere: nad-jax-clean's --batch-size and --lr
    recipes['teacher'] = dict(epochs=teacher_epochs, batch_size=batch_size,
                              learning_rate=learning_rate)
  for section, recipe in recipes.items():
    for field, value in recipe.items():
      if value is None:
        continue
      if field in options.get(section, {}):  # e.g. epochs=3 and nad={'epochs': 5}
        raise validation.ConfigError(
            f'{section}.{field}: given twice, as {field}={value!r} and {section}='
            f'{{{field!r}: {options[section][field]!r}}}; give one')
      _assign(config[section], f'{section}.{field}', value)
  _refuse_unread(options, config, 'erase', method)  # FP's own fields are set by now
  trains = {'nad': ('teacher', 'nad') if trains_teacher else ('nad',), 'ft': ('nad',),
            'fp': ('fp',), 'mcr': ('nad', 'mcr')}[method]
  ctx = _context(dataset, config, trains)
  student = _on_devices(ctx, variables)
  clean = stages.clean_data(ctx)
  if method == 'nad' and teacher is not None:
    return _result(nad_lib.distill(ctx, student, _on_devices(ctx, teacher), clean), ctx)
  return _result(defenses.ERASE[method](ctx, student, clean), ctx)


def evaluate(dataset: data_lib.Dataset, variables: dict, *, config=None,
             **options) -> dict[str, Any]:
  """acc (clean test accuracy), acc_nontarget, asr and ra of `variables`, in percent.

  Args:
    dataset: its test split is evaluated; asr triggers its non-target images.
    variables: {'params', 'batch_stats'} of the model.
    config, **options: see `make_config`: model, attack, target_label and the other
      attack fields but poison_rate and clean_label, data.eval_batch_size; seed for
      Refool, whose test triggers draw each image's reflection from the seed, one key per
      evaluation batch (so Refool's asr and ra also depend on eval_batch_size).

  Returns:
    {'acc', 'acc_nontarget', 'asr', 'ra'} as floats in [0, 100] (ra: the triggered
    non-target test images classified as their true label).

  Raises:
    ConfigError: a bad option, or one it does not read (seed but for Refool, clean_fraction,
      poison_rate, a training stage's section), named; or variables that do not fit the
      model.
  """
  config = make_config(config, **options)
  _refuse_unread(options, config, 'evaluate')
  ctx = _context(dataset, config, ())
  return stages.evaluate(ctx, _on_devices(ctx, variables))
