"""Every check of a config, and of a workdir against it, before anything is written.

`RULES` is one table: a row names a config field, the rule it must satisfy and what is
allowed. `validate` runs the rows that apply before any data is loaded; `validate_data`
runs the few that need the dataset (class count, split sizes). `check_workdir` compares
the config with the one each finished or partly trained stage of a workdir was trained
with, so a rerun never resumes, or reports, a model that another config made.
"""

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from nad_jax import attacks as attacks_lib
from nad_jax.attacks import core as attack_core
from nad_jax.attacks import refool, sig
from nad_jax import checkpoint as ckpt_lib
from nad_jax import defaults
from nad_jax import models
from nad_jax import train


class ConfigError(ValueError):
  """A config value, file, path or workdir the run cannot use; the message names it."""


class Rule(NamedTuple):
  """One row of the table: `field` (dotted) must satisfy `ok(value, config)`.

  `allowed` says what is allowed; `{devices}` in it is the device count, `{layers}` the
  layers NAD distils. `when(config)`
  says whether the row applies (default: always, where the config has the field).
  """
  field: str
  ok: Callable[[Any, Any], bool]
  allowed: str
  when: Callable[[Any], bool] = lambda config: True


# ------------------------------------------------------------------------ value predicates

def is_int(v) -> bool:
  """An int (numpy ints too), not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
  """A finite int or float (numpy scalars too), not a bool."""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
      and math.isfinite(v)


def in_range(low=-math.inf, high=math.inf, low_open=False, high_open=False, integer=False):
  """A predicate: a finite number (an int where `integer`) within the given bounds."""
  def ok(v, _=None):
    if not (is_int(v) if integer else is_number(v)):
      return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  return ok


def one_of(choices):
  """A predicate: a member of `choices`."""
  return lambda v, _=None: v in tuple(choices)


def is_bool(v, _=None) -> bool:
  """True or False (numpy bools too)."""
  return isinstance(v, (bool, np.bool_))


def optional(predicate):
  """A predicate: None, or what `predicate` accepts."""
  return lambda v, config=None: v is None or predicate(v, config)


def positive_multiple_of_devices(v, _=None) -> bool:
  """A positive int that the device count divides (a batch split over the mesh)."""
  return is_int(v) and v > 0 and v % jax.device_count() == 0


def number_tuple(length=None, low=-math.inf, low_open=False):
  """A predicate: a tuple or list of numbers >= `low` (> where `low_open`), of a length in
  `length` (any where None)."""
  def ok(v, _=None):
    return (isinstance(v, (tuple, list)) and (length is None or len(v) in length)
            and all(in_range(low, low_open=low_open)(x) for x in v))
  return ok


def increasing_epochs(v, _=None) -> bool:
  """A tuple or list of strictly increasing epoch numbers >= 0."""
  return (isinstance(v, (tuple, list)) and all(is_int(b) and b >= 0 for b in v)
          and list(v) == sorted(set(v)))


def existing_path(v, _=None) -> bool:
  """None, '', or a file or folder that exists."""
  return v is None or v == '' or (isinstance(v, str) and os.path.exists(v))


def has(section):
  """A `when`: the config has `section` (not None)."""
  return lambda config: config.get(section) is not None


class ReadBy(NamedTuple):
  """A `when` for a field that only some choices read: the field `selector` (dotted, e.g.
  'attack.name') is one of `names`, the choices that read it. `kind` names a choice in
  messages ('attack', 'source'); `refuse_unread_fields` refuses the field elsewhere."""
  selector: str
  kind: str
  names: tuple[str, ...]

  def __call__(self, config) -> bool:
    return lookup(config, self.selector) in self.names


def data_source(*sources) -> ReadBy:
  """A `when` for a data field: `data.source` is one of `sources`, the sources that read it
  (nad_jax/data.py load_dataset)."""
  return ReadBy('data.source', 'source', sources)


def attack_is(*names) -> ReadBy:
  """A `when` for an attack's own field: `attack.name` is one of `names`, the attacks that
  read it."""
  return ReadBy('attack.name', 'attack', names)


def distill_layers(config) -> tuple[str, ...]:
  """The layers NAD distils: `nad.layers`, or the model's low/middle/high groups."""
  if config.nad.get('layers'):
    return tuple(config.nad.layers)
  return tuple(models.build_model(config.model.name, 10).distill_layers)


def betas_fit_layers(v, config) -> bool:
  """Non-negative numbers, one per distilled layer (`distill_layers`)."""
  return number_tuple(low=0.0)(v) and len(v) == len(distill_layers(config))


def sgd_rows(section: str, when=lambda config: True) -> list[Rule]:
  """The rows of a training stage made by nad_jax/defaults.py's sgd_stage."""
  return [
      Rule(f'{section}.epochs', in_range(0, integer=True), 'an integer >= 0', when),
      Rule(f'{section}.batch_size', positive_multiple_of_devices,
           'a positive integer multiple of the device count ({devices})', when),
      Rule(f'{section}.learning_rate', in_range(0, low_open=True), 'a number > 0', when),
      Rule(f'{section}.lr_boundaries', increasing_epochs,
           'a tuple of increasing epoch numbers >= 0 (where the learning rate decays)', when),
      Rule(f'{section}.lr_decay', in_range(0, low_open=True), 'a number > 0', when),
      Rule(f'{section}.momentum', in_range(0, 1, high_open=True), 'a number in [0, 1)', when),
      Rule(f'{section}.nesterov', is_bool, 'True or False', when),
      Rule(f'{section}.weight_decay', in_range(0), 'a number >= 0', when),
      Rule(f'{section}.crop_flip', is_bool, 'True or False', when),
      Rule(f'{section}.cutout', in_range(0, integer=True), 'an integer >= 0 (0: no Cutout)',
           when),
      Rule(f'{section}.eval_every', in_range(1, integer=True), 'an integer >= 1', when),
      Rule(f'{section}.lr_schedule', one_of(train.LR_SCHEDULES),
           "'step' (lr_decay at lr_boundaries), 'cosine' (annealed per epoch towards 0) or "
           "'curve' (held, then linear to 1%)", when),
      Rule(f'{section}.lr_boundaries', lambda v, c: not v or c[section].get(
          'lr_schedule', 'step') == 'step',
           f"() where {section}.lr_schedule is not 'step' (boundaries belong to 'step')",
           when),
  ]


def coordinator_address(v, _=None) -> bool:
  """'' or 'host:port' (an IPv6 host in brackets), the port an integer in 1..65535."""
  if v == '':
    return True
  if not isinstance(v, str) or ':' not in v:
    return False
  host, port = v.rsplit(':', 1)
  return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def distinct_seeds(v, _=None) -> bool:
  """A tuple or list of distinct integers >= 0 (empty: one run with `seed`)."""
  return (isinstance(v, (tuple, list)) and all(is_int(s) and s >= 0 for s in v)
          and len(set(v)) == len(v))


def mean_std_pair(_, config) -> bool:
  """`model.mean` and `model.std` are both set or both None."""
  mean, std = config.model.mean, config.model.std
  return (mean is None) == (std is None)


RULES: list[Rule] = [
    Rule('seed', in_range(0, integer=True), 'an integer >= 0'),
    Rule('seeds', distinct_seeds, 'a tuple of distinct integers >= 0, e.g. (0, 1, 2) '
         '(empty: the one seed `seed`)'),
    Rule('seed', lambda v, config: v == 0 or not config.get('seeds'),
         "0 (its default) when seeds is set: seeds lists every seed of the run"),
    Rule('runner', one_of(('nad', 'table1')), "'nad' or 'table1'"),
    Rule('runner', lambda v, c: (v == 'table1') == (c.get('table') is not None),
         "'table1' where the config has a table section (configs/table1.py), 'nad' where it "
         'has none'),
    Rule('eval_only', is_bool, 'True or False'),
    # distributed: checked before jax.distributed.initialize, so no row may start a backend
    Rule('distributed.enabled', is_bool, 'True or False'),
    Rule('distributed.coordinator_address', coordinator_address,
         "'' (JAX detects it) or 'host:port' of process 0, the port in 1..65535"),
    Rule('distributed.num_processes', optional(in_range(1, integer=True)),
         'None (JAX detects it) or an integer >= 1'),
    Rule('distributed.process_id', optional(in_range(0, integer=True)),
         'None (JAX detects it) or an integer >= 0'),
    Rule('distributed.process_id', lambda v, c: v < c.distributed.num_processes,
         'less than distributed.num_processes (ids run 0 .. num_processes - 1)',
         lambda c: is_int(c.distributed.process_id) and is_int(c.distributed.num_processes)),
    Rule('distributed.local_device_ids',
         optional(lambda v, _: isinstance(v, (tuple, list)) and len(v) >= 1
                  and all(in_range(0, integer=True)(x) for x in v) and len(set(v)) == len(v)),
         'None (all local devices) or a tuple of distinct device indices >= 0'),
    Rule('distributed.initialization_timeout', in_range(1, integer=True),
         'an integer >= 1 (seconds)'),
    Rule('distributed.heartbeat_timeout', in_range(1, integer=True), 'an integer >= 1 (seconds)'),
    Rule('distributed.enabled', lambda v, c: v or all(
        lookup(c, f'distributed.{f}') in (None, '')
        for f in ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')),
         'True where distributed.coordinator_address, num_processes, process_id or '
         'local_device_ids is set (else each process would run alone)'),
    Rule('scan_epoch', optional(is_bool), 'None (the backend decides), True or False'),
    Rule('compilation_cache', lambda v, _: isinstance(v, str), "a folder, or '' for none"),
    # model
    Rule('model.name', one_of(models.MODELS), f'one of {sorted(models.MODELS)}'),
    Rule('model.dtype', one_of(models.DTYPES), f'one of {sorted(models.DTYPES)}'),
    Rule('model.conv', one_of(models.CONVS), f'one of {list(models.CONVS)}'),
    Rule('model.conv', lambda v, _: jax.default_backend() == 'cpu' and jax.device_count() == 1,
         "'auto' or 'xla' here: 'onednn' runs on one CPU device",
         lambda c: c.model.conv == 'onednn'),
    Rule('model.mean', optional(number_tuple(length=(1, 3))),
         'None or a tuple of 1 or 3 numbers (one per channel, on pixels / 255)'),
    Rule('model.std', optional(number_tuple(length=(1, 3), low=0.0, low_open=True)),
         'None or a tuple of 1 or 3 numbers > 0'),
    Rule('model.std', mean_std_pair, 'set together with model.mean (both or neither)'),
    Rule('model.std', lambda v, c: len(v) == len(c.model.mean),
         'as many numbers as model.mean',
         lambda c: c.model.mean is not None and c.model.std is not None),
    # data
    Rule('data.source', one_of(('synthetic', 'tfds', 'folder')),
         "'synthetic', 'tfds' or 'folder'"),
    Rule('data.name', lambda v, _: isinstance(v, str) and bool(v),
         'a TensorFlow Datasets name, e.g. cifar10', data_source('tfds')),
    Rule('data.data_dir', optional(lambda v, _: isinstance(v, str)),
         'None (tfds default) or a folder', data_source('tfds')),
    Rule('data.path', lambda v, _: isinstance(v, str) and os.path.isdir(v),
         'an existing folder holding train/<class>/<image> and test/<class>/<image>',
         data_source('folder')),
    Rule('data.train_size', in_range(1, integer=True), 'an integer >= 1',
         data_source('synthetic')),
    Rule('data.test_size', in_range(1, integer=True), 'an integer >= 1',
         data_source('synthetic')),
    Rule('data.seed', in_range(0, integer=True), 'an integer >= 0',
         data_source('synthetic')),
    Rule('data.num_classes', in_range(2, integer=True), 'an integer >= 2',
         data_source('synthetic')),
    Rule('data.textures_per_class', in_range(1, integer=True), 'an integer >= 1',
         data_source('synthetic')),
    Rule('data.clean_fraction', in_range(0, 1, low_open=True), 'a fraction in (0, 1]'),
    Rule('data.eval_batch_size', positive_multiple_of_devices,
         'a positive integer multiple of the device count ({devices})'),
    # attack: the fields every attack shares (nad_jax/attacks/__init__.py)
    Rule('attack.name', one_of(attacks_lib.ATTACKS), f'one of {sorted(attacks_lib.ATTACKS)}'),
    Rule('attack.target_label', in_range(0, integer=True), 'an integer >= 0'),
    Rule('attack.poison_rate', in_range(0, 1),
         'a fraction in [0, 1] (of the training set; of the target class for clean-label '
         'attacks; 0 trains an unpoisoned model)'),
    Rule('attack.mode', one_of(('all_to_one', 'all_to_all')), "'all_to_one' or 'all_to_all'"),
    Rule('attack.seed', in_range(0, integer=True), 'an integer >= 0',
         attack_is('blend', 'refool', 'trojan', 'wanet')),
    Rule('attack.clean_label', optional(is_bool),
         "None (the attack's default), True or False"),
    Rule('attack.pattern_path', existing_path, "'' or an existing file or folder",
         attack_is('trojan', 'blend', 'sig', 'refool')),
    Rule('attack.path', lambda v, _: isinstance(v, str) and os.path.exists(v),
         'an existing .npz file, image folder or BackdoorBench record', attack_is('files')),
    # attack: each attack's own fields (documented in its module)
    Rule('attack.pattern', one_of(('grid', 'square')), "'grid' or 'square'",
         attack_is('badnets', 'cl')),
    Rule('attack.size', in_range(1, integer=True), 'an integer >= 1',
         attack_is('badnets', 'cl', 'trojan')),
    Rule('attack.corner', one_of(('bottom_right', 'bottom_left', 'top_right', 'top_left')),
         "'bottom_right', 'bottom_left', 'top_right' or 'top_left'", attack_is('badnets', 'cl')),
    Rule('attack.alpha', in_range(0, 1, low_open=True), 'a number in (0, 1]',
         attack_is('blend', 'sig')),
    Rule('attack.delta', in_range(0, low_open=True), 'a number > 0 (pixel units)',
         attack_is('sig')),
    Rule('attack.frequency', in_range(0, low_open=True), 'a number > 0', attack_is('sig')),
    Rule('attack.sig_mode', one_of(sig.MODES), f'one of {list(sig.MODES)}', attack_is('sig')),
    Rule('attack.amplitude', in_range(0, 255, low_open=True), 'a number in (0, 255]',
         attack_is('cl')),
    Rule('attack.pgd_eps', in_range(0, 255), 'a number in [0, 255] (pixel units)',
         attack_is('cl')),
    Rule('attack.pgd_step', in_range(0, low_open=True), 'a number > 0 (pixel units)',
         attack_is('cl')),
    Rule('attack.pgd_steps', in_range(0, integer=True), 'an integer >= 0', attack_is('cl')),
    Rule('attack.surrogate.model', one_of(models.MODELS), f'one of {sorted(models.MODELS)}',
         attack_is('cl', 'trojan', 'refool')),
    Rule('attack.surrogate.epochs', in_range(1, integer=True), 'an integer >= 1',
         attack_is('cl', 'refool')),
    Rule('attack.surrogate.batch_size', positive_multiple_of_devices,
         'a positive integer multiple of the device count ({devices})', attack_is('cl', 'refool')),
    Rule('attack.surrogate.learning_rate', in_range(0, low_open=True), 'a number > 0',
         attack_is('cl', 'refool')),
    Rule('attack.surrogate.lr_boundaries', increasing_epochs,
         'a tuple of increasing epoch numbers >= 0', attack_is('cl', 'refool')),
    Rule('attack.surrogate.crop_flip', is_bool, 'True or False', attack_is('cl', 'refool')),
    Rule('attack.trojan_neurons', in_range(1, integer=True), 'an integer >= 1',
         attack_is('trojan')),
    Rule('attack.trojan_steps', in_range(1, integer=True), 'an integer >= 1',
         attack_is('trojan')),
    Rule('attack.reflection_source', one_of(refool.SOURCES), f'one of {list(refool.SOURCES)}',
         attack_is('refool')),
    Rule('attack.reflections', in_range(1, integer=True), 'an integer >= 1',
         attack_is('refool')),
    Rule('attack.reflection_candidates', in_range(1, integer=True), 'an integer >= 1',
         attack_is('refool')),
    Rule('attack.selection_rounds', in_range(0, integer=True),
         'an integer >= 0 (0: no selection)', attack_is('refool')),
    Rule('attack.selection_holdout', in_range(1, integer=True), 'an integer >= 1',
         attack_is('refool')),
    Rule('attack.ghost_rate', in_range(0, 1), 'a fraction in [0, 1]', attack_is('refool')),
    Rule('attack.reflection_strength',
         lambda v, _: number_tuple(length=(2,), low=0.0)(v) and v[0] <= v[1] <= 1,
         'a pair (low, high) with 0 <= low <= high <= 1', attack_is('refool')),
    Rule('attack.warp_k', in_range(2, integer=True), 'an integer >= 2', attack_is('wanet')),
    Rule('attack.warp_strength', in_range(0, low_open=True), 'a number > 0',
         attack_is('wanet')),
    Rule('attack.cross_ratio', in_range(0), 'a number >= 0', attack_is('wanet')),
    # stages
    *sgd_rows('backdoor_training'),
    Rule('student.checkpoint', existing_path, 'None or an existing file or folder'),
    Rule('student.checkpoint', lambda v, _: bool(v),
         "a backdoored model to load: attack 'files' has no trigger to train one with",
         attack_is('files')),
    *sgd_rows('teacher'),
    Rule('teacher.source', one_of(('finetune', 'scratch')), "'finetune' or 'scratch'"),
    Rule('teacher.checkpoint', existing_path, 'None or an existing file or folder'),
    *sgd_rows('nad'),
    Rule('nad.layers', optional(lambda v, c: isinstance(v, (tuple, list)) and len(v) >= 1
                                and all(isinstance(x, str) for x in v)),
         'None (the model\'s low/middle/high groups) or a tuple of sown layer names'),
    Rule('nad.betas', betas_fit_layers,
         'one number >= 0 per distilled layer ({layers})'),
    Rule('nad.p', in_range(0, low_open=True), 'a number > 0'),
    # the comparison runner (configs/table1.py)
    *sgd_rows('fp', has('fp')),
    Rule('fp.holdout_fraction', in_range(0, 1, low_open=True, high_open=True),
         'a fraction in (0, 1)', has('fp')),
    Rule('fp.acc_drop', in_range(0), 'a number >= 0 (accuracy points)', has('fp')),
    *sgd_rows('mcr', has('mcr')),
    Rule('mcr.t', in_range(0, 1), 'a number in [0, 1]', has('mcr')),
    Rule('mcr.points', in_range(2, integer=True), 'an integer >= 2', has('mcr')),
    Rule('mcr.samples_per_epoch', in_range(0, integer=True),
         'an integer >= 0 (an epoch repeats the clean subset to this many samples)', has('mcr')),
    Rule('table.attacks', lambda v, c: len(v) >= 1 and set(v) <= set(c.table.attack_configs)
         and len(set(v)) == len(v),
         'a non-empty tuple of distinct names in table.attack_configs', has('table')),
    Rule('table.defenses', lambda v, _: len(v) >= 1 and set(v) <= {'none', 'ft', 'fp', 'mcr',
                                                                    'nad'},
         "a non-empty tuple of 'none', 'ft', 'fp', 'mcr', 'nad'", has('table')),
    Rule('table.figures', is_bool, 'True or False', has('table')),
    Rule('table.figures', lambda v, c: not v or c.eval_only
         or importlib.util.find_spec('matplotlib'),
         "False where matplotlib is not installed (pip install '.[plots]' draws the figures)",
         has('table')),
    Rule('table.attention_images', in_range(0, integer=True), 'an integer >= 0', has('table')),
]


def lookup(config, field: str):
  """The value at a dotted field; KeyError where the config has no such field."""
  value = config
  for part in field.split('.'):
    if value is None or part not in value:
      raise KeyError(field)
    value = value[part]
  return value


def validate(config, section: str = '') -> None:
  """Checks every row of RULES that applies; raises ConfigError naming the first failure.

  Args:
    config: an ml_collections ConfigDict shaped like nad_jax/defaults.py's paper_config
      (a field the config lacks is not checked).
    section: check only the rows of this section (e.g. 'distributed', before JAX starts);
      '' checks every row.

  Raises:
    ConfigError: `<field> <value>: must be <allowed>`.
  """
  for rule in RULES:
    if section and not rule.field.startswith(section + '.'):
      continue
    try:
      value = lookup(config, rule.field)
      applies = rule.when(config)
    except KeyError:
      continue
    if applies and not rule.ok(value, config):
      allowed = rule.allowed.format(devices=jax.device_count(), layers=(
          f'nad.layers {tuple(config.nad.layers)}' if config.nad.get('layers') else
          f"{config.model.name}'s groups {distill_layers(config)}; or set nad.layers")
          if '{layers}' in rule.allowed else '')
      raise ConfigError(f'{rule.field} {value!r}: must be {allowed}')
  if section in ('', 'attack') and config.get('table') is None:  # a table: per attack
    refuse_unread_fields(config, 'attack')


def same(value, default) -> bool:
  """Equal, reading a list as the tuple a command-line override or JSON gives back."""
  value = tuple(value) if isinstance(value, list) else value
  default = tuple(default) if isinstance(default, list) else default
  return value == default


def lies_in(field: str, names) -> bool:
  """Whether dotted `field` is one of `names` or lies in one of them (a section)."""
  return any(field == name or field.startswith(name + '.') for name in names)


def poisoning_fields(attack_cfg) -> tuple[str, ...]:
  """The `attack.` fields that only the poisoning of a training set reads, so that a run
  given the backdoored model does not: poison_rate and clean_label, but for Refool's
  adversarial selection (selection_rounds > 0), whose choice of trigger reads poison_rate."""
  selects = attack_cfg.name == 'refool' and attack_cfg.get('selection_rounds', 0) > 0
  return ('attack.clean_label',) if selects else ('attack.poison_rate', 'attack.clean_label')


def unread_fields(config) -> dict:
  """{field or section: why}: what a run does not read because it loads a model instead of
  training it (`student.checkpoint`: the backdoored model's training and poisoning;
  `teacher.checkpoint`: the teacher's recipe), or because an all-to-all backdoor has no
  target label."""
  unread = {}
  if config.attack.mode == 'all_to_all':
    unread['attack.target_label'] = 'an all-to-all backdoor relabels y as y+1, with no target'
  if config.student.checkpoint:
    why = 'the backdoored model is loaded from student.checkpoint, not trained'
    unread.update(dict.fromkeys(('backdoor_training', *poisoning_fields(config.attack)), why))
  if config.get('teacher') and config.teacher.checkpoint:
    unread.update({f'teacher.{field}': 'the teacher is loaded from teacher.checkpoint, not '
                   'trained' for field in config.teacher if field != 'checkpoint'})
  return unread


def refuse_overrides(config, fields, unread: dict, prefix: str = '') -> None:
  """Raises ConfigError for a field the user set that the run does not read, which the
  run would otherwise record as if used.

  Args:
    config: the run's config, overrides applied.
    fields: the dotted fields the user set (`--config.<field>=...`), relative to `config`.
    unread: {dotted field or section: why the run does not read it}.
    prefix: where `config` sits in the user's config, for the message (a table's
      'table.attack_configs.<attack>.').

  Raises:
    ConfigError: naming the field, its value and why, ending in 'leave it out'.
  """
  for field in fields:
    for name, why in unread.items():
      if lies_in(field, (name,)):
        raise ConfigError(f'{prefix}{field} {lookup(config, field)!r}: {why}; leave it out')


def unread_set_fields(config, section: str, fields=None) -> list[tuple[str, Any, Any, ReadBy]]:
  """The fields of `section` that the choice picking what is read does not read (the rows
  whose `when` is a ReadBy) and that are set: (field, value, the paper's default, its
  ReadBy), in RULES order.

  Args:
    config: a config shaped like nad_jax/defaults.py paper_config().
    section: 'attack' or 'data'.
    fields: the dotted fields the user set (command-line overrides, keywords), each
      counted where unread; None: every field of `section` set away from the paper's
      default. A config file's data section sets the synthetic set's sizes, which an
      image folder given on the command line leaves unread: only what the user set
      counts there.
  """
  paper = defaults.paper_config()
  found = []
  for rule in RULES:
    if not (rule.field.startswith(section + '.') and isinstance(rule.when, ReadBy)):
      continue
    if fields is not None and rule.field not in fields:
      continue
    try:
      value = lookup(config, rule.field)
    except KeyError:
      continue
    default = lookup(paper, rule.field)
    if rule.when(config) or (fields is None and (value is None or same(value, default))):
      continue
    found.append((rule.field, value, default, rule.when))
  return found


def readers(when: ReadBy) -> str:
  """'only sig does', 'only blend, sig do': the choices that read a field, for a message."""
  return f'only {", ".join(when.names)} {"does" if len(when.names) == 1 else "do"}'


def refuse_unread_fields(config, section: str, fields=None) -> None:
  """Refuses a field of `section` that the choice picking what is read does not read
  (`unread_set_fields`): an attack field the attack ignores (`--config.attack.alpha=0.5`
  with BadNets), a data field the data source ignores (`--config.data.train_size=100` with
  an image folder). The run would silently ignore it and still record it.

  Args:
    config, section, fields: as `unread_set_fields`.

  Raises:
    ConfigError: naming the field, its value, the choice that does not read it and the
      choices that do.
  """
  for field, value, default, when in unread_set_fields(config, section, fields)[:1]:
    raise ConfigError(f'{field} {value!r}: the {lookup(config, when.selector)} {when.kind} does '
                      f'not read it ({readers(when)}); '
                      + (f'leave it at {default!r}' if fields is None else 'leave it out'))


# The config sections of the stages that train, and the data each trains on.
TRAINED_SECTIONS = ('backdoor_training', 'teacher', 'nad', 'fp', 'mcr')


def validate_data(config, num_classes: int, train_size: int, clean_size: int,
                  test_labels: np.ndarray, stages: tuple[str, ...] = TRAINED_SECTIONS) -> None:
  """The rules that need the dataset; raises ConfigError naming the field.

  Args:
    config: the run's config.
    num_classes: the dataset's class count.
    train_size, clean_size: images in the training set and in the clean subset.
    test_labels: (N,) int labels of the test split.
    stages: the sections (of TRAINED_SECTIONS) that will train.
  """
  target = config.attack.target_label
  if not 0 <= target < num_classes:
    raise ConfigError(f'attack.target_label {target}: must be in [0, {num_classes}) for a '
                      f'dataset of {num_classes} classes')
  mcr_size = max(clean_size, config.mcr.samples_per_epoch) if 'mcr' in config else clean_size
  sizes = {'backdoor_training': train_size, 'teacher': clean_size, 'nad': clean_size,
           'fp': clean_size, 'mcr': mcr_size}
  for stage, size in sizes.items():
    cfg = config.get(stage) if stage in stages else None
    if cfg is not None and cfg.epochs and cfg.batch_size > size:
      raise ConfigError(f'{stage}.batch_size {cfg.batch_size}: must be at most the {size} '
                        'training images of that stage')
  if config.attack.mode == 'all_to_one' and np.all(np.asarray(test_labels) == target):
    raise ConfigError(f'attack.target_label {target}: every test image is of the target class, '
                      'so ASR and acc_nontarget (measured on the non-target test images) are '
                      'undefined; use a test split with other classes')


def validate_poisoning(config, count: int, candidates: int) -> None:
  """A poison rate that poisons no training sample is an error, not an ASR of 0.

  Args:
    config: the run's config.
    count: the training images the attack poisons.
    candidates: the images it may poison (the target class's, for clean-label attacks).
  """
  if count == 0 and config.attack.poison_rate > 0:
    raise ConfigError(
        f'attack.poison_rate {config.attack.poison_rate} with attack.target_label '
        f'{config.attack.target_label} poisons 0 of the {candidates} candidate training '
        'images (clean-label attacks poison images of the target class only): raise '
        'attack.poison_rate or choose a target_label with training images')


# ------------------------------------------------------------------- workdir fingerprints

FINGERPRINT = 'stage_config.json'
# Fields that never change what a stage trains (evaluation cadence, caches, devices).
NOT_SHAPING = ('eval_only', 'runner', 'distributed', 'compilation_cache', 'scan_epoch',
               'model.conv', 'data.eval_batch_size', 'table')
# NOT_SHAPING fields that do shape one stage: MCR recomputes each curve point's BatchNorm
# statistics in batches of the evaluation's size (defenses/mcr.py, curve_point).
SHAPING_FOR = {'mcr': ('data.eval_batch_size',)}
# Fields that shape what a stage's run evaluates but not what it trains: an evaluation-only
# run may set them anew (MCR's point on the trained curve, its curve's points, and the
# batches its BatchNorm statistics are recomputed in).
EVALUATED_ONLY = ('mcr.t', 'mcr.points', 'data.eval_batch_size')
# The sections that shape each stage: its own and those of the stages it starts from.
BACKDOORED = ('seed', 'seeds', 'data', 'model', 'attack', 'backdoor_training', 'student')
# Fields newer than some stage folders, with the value that those folders trained with.
ADDED_FIELDS = {'seeds': [], 'data.seed': 0}
STAGE_SECTIONS = {
    'backdoored': BACKDOORED,
    'teacher': BACKDOORED + ('teacher',),
    'nad': BACKDOORED + ('teacher', 'nad'),
    'ft': BACKDOORED + ('nad',),  # FT is the NAD stage with betas 0
    'fp': BACKDOORED + ('nad', 'fp'),
    'mcr': BACKDOORED + ('nad', 'mcr'),  # the curve ends at the FT model
}
# The config section that trains a stage, where its name differs (FT trains with NAD's).
SECTIONS = {'backdoored': 'backdoor_training', 'ft': 'nad'}
# Fields of a shaping section that do not shape that stage.
STAGE_IGNORES = {'ft': ('nad.betas', 'nad.p', 'nad.layers'),
                 'fp': ('nad',),  # its fp.* fields hold the values they follow of nad's
                 'mcr': ('nad.betas', 'nad.p', 'nad.layers')}


def flatten(tree, prefix='') -> dict:
  """A nested dict as {dotted key: leaf}."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def other_attacks_fields(attack_name: str) -> tuple[str, ...]:
  """The `attack.` fields that only attacks other than `attack_name` read."""
  return tuple(f'attack.{f}' for name, own in attack_core.OWN_FIELDS.items()
               if name != attack_name for f in own)


def other_sources_fields(source: str) -> tuple[str, ...]:
  """The `data.` fields that only data sources other than `source` read (a folder run
  does not depend on the synthetic set's sizes a config file sets)."""
  return tuple(rule.field for rule in RULES if rule.field.startswith('data.')
               and isinstance(rule.when, ReadBy) and source not in rule.when.names)


def check_folder(path: str, field: str) -> None:
  """Raises ConfigError where `path` cannot be a folder to write into: empty, a file, or
  below a file.

  Args:
    path: the folder (it may not exist yet).
    field: the flag or field that named it, for the message.
  """
  if not path:
    raise ConfigError(f"{field} '': name a folder")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f'{field} {path}: ' + ('a file, not a folder' if parent ==
                                              os.path.abspath(path) else f'{parent} is a file'))


def shaping_fields(config, stage: str) -> tuple[str, ...]:
  """The NOT_SHAPING fields that shape `stage` or its figures in this run: SHAPING_FOR's,
  and the evaluation's batch where the attack draws its test triggers per image
  (`attacks.DRAWS_PER_IMAGE`): each evaluation batch draws from its own key, so the batch
  size changes which reflections Refool's ASR and RA are measured on."""
  return SHAPING_FOR.get(stage, ()) + (('data.eval_batch_size',) if config.attack.name
                                       in attacks_lib.DRAWS_PER_IMAGE else ())


def evaluated_only(config) -> tuple[str, ...]:
  """The EVALUATED_ONLY fields an evaluation-only run of `config` may set anew."""
  return tuple(f for f in EVALUATED_ONLY if f not in shaping_fields(config, 'backdoored'))


def ignored_fields(config, stage: str) -> tuple[str, ...]:
  """The fields and sections (dotted) of `stage`'s sections that do not shape it."""
  not_shaping = tuple(f for f in NOT_SHAPING if f not in shaping_fields(config, stage))
  return (not_shaping + STAGE_IGNORES.get(stage, ()) + other_attacks_fields(config.attack.name)
          + other_sources_fields(config.data.source))


def is_in(field: str, names) -> bool:
  """Whether dotted `field` lies in `names` (`lies_in`) or is an evaluation cadence
  (`*.eval_every`, which never shapes a stage)."""
  return field.endswith('.eval_every') or lies_in(field, names)


# The stages a config may load instead of training, and the fields that name the file.
LOADABLE = {'backdoored': 'student.checkpoint', 'teacher': 'teacher.checkpoint'}
LOADED_FIELDS = tuple(LOADABLE.values())
# The attack's files (a trigger pattern, a folder of reflections, a poisoned test set).
ATTACK_FILE_FIELDS = ('attack.pattern_path', 'attack.path')
# The digests `stage_fields` records of what those name: the loaded models, the files.
CONTENT_DIGESTS = tuple(f'{field}.digest' for field in LOADED_FIELDS + ATTACK_FILE_FIELDS)


def files_digest(path: str) -> str:
  """A short SHA-256 of the file at `path`, or of every file under the folder at `path`
  (their relative paths and bytes, in name order)."""
  digest = hashlib.sha256()
  files = ([path] if os.path.isfile(path) else
           sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names))
  for name in files:
    digest.update(os.path.relpath(name, path).encode())
    with open(name, 'rb') as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def attack_file_digests(config) -> dict:
  """{field: `files_digest`} of each ATTACK_FILE_FIELDS path the attack reads."""
  return {field: files_digest(lookup(config, field)) for field in ATTACK_FILE_FIELDS
          if config.attack.get(field.split('.')[1])
          and not unread_set_fields(config, 'attack', (field,))}


def stage_fields(config, stage: str, data_digest: str | None = None, *,
                 contents: dict | None = None) -> dict:
  """{dotted field: JSON value} of the config fields that shape `stage`, plus
  'data.digest' (of the images and labels themselves) where `data_digest` is given, and
  '<field>.digest' for each path field of `contents` ({'student.checkpoint':
  `variables_digest` of the model it loads, 'attack.pattern_path': `files_digest`, ...})
  that shapes the stage: another model or file at the same path is another run."""
  as_dict = config.to_dict()
  fields = flatten({k: as_dict[k] for k in STAGE_SECTIONS[stage] if k in as_dict})
  ignored = ignored_fields(config, stage)
  fields = {k: v for k, v in fields.items() if not is_in(k, ignored)}
  if data_digest:
    fields['data.digest'] = data_digest
  fields.update({f'{field}.digest': digest for field, digest in (contents or {}).items()
                 if fields.get(field)})
  return json.loads(json.dumps(fields, default=str))  # tuples -> lists, as read back


def variables_digest(variables) -> str:
  """A short SHA-256 of a model's variables (each array's path, dtype and values)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.asarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)} {array.dtype}'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def differences(recorded: dict, current: dict) -> list[str]:
  """'field old -> new' for each field whose value differs between two `stage_fields` (a
  digest named by what it digests)."""
  missing = object()
  named = {'data.digest': 'the data (its images or labels changed; digest)',
           **{f'{f}.digest': f'the model at {f} (its weights changed; digest)'
              for f in LOADED_FIELDS},
           **{f'{f}.digest': f'the files at {f} (their content changed; digest)'
              for f in ATTACK_FILE_FIELDS}}
  return [f'{named.get(k, k)} {recorded.get(k, "(unset)")!r} -> {current.get(k, "(unset)")!r}'
          for k in sorted(recorded.keys() | current.keys())
          if recorded.get(k, missing) != current.get(k, missing)]


def check_workdir(config, workdir: str, stages, data_digest: str | None = None,
                  evaluating: bool = False, *, contents: dict | None = None) -> None:
  """Raises ConfigError where a stage folder of `workdir` was trained with other values.

  Args:
    config: the run's config.
    workdir: the run's folder (it may not exist yet).
    stages: the stage names (keys of STAGE_SECTIONS) this run may resume.
    data_digest: `data_digest` of the run's dataset; None checks the config alone.
    contents: `stage_fields`' digests of what path fields name (the loaded models, the
      attack's files); None (before the models are loaded) checks the fields alone. A
      record without these digests (written before nad-jax recorded them) is taken on its
      paths.
    evaluating: an evaluation-only run, which trains nothing: EVALUATED_ONLY fields may
      differ, and the message does not offer to train the stage again.

  Raises:
    ConfigError: naming the stage, its folder, each differing field (old -> new) and what
      to do; also for a stage folder with checkpoints but no record of its config.
  """
  for stage in stages:
    directory = os.path.join(workdir, stage)
    if not os.path.isdir(directory):
      continue
    saved = ckpt_lib.finished_epochs(directory)
    record = os.path.join(directory, FINGERPRINT)
    if not os.path.isfile(record):
      if saved:
        raise ConfigError(f'stage {stage!r}: {directory} holds checkpoints without a record '
                          'of the config that trained them; use another --workdir or delete '
                          'the folder')
      continue
    try:
      with open(record) as f:
        written = json.load(f)
      recorded, ran_with = written['fields'], written.get('ran_with') or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      raise ConfigError(f'stage {stage!r}: {record} is unreadable; use another --workdir '
                        'or delete the folder') from None
    current = stage_fields(config, stage, data_digest, contents=contents)
    # An older record may list fields read elsewhere (other attacks' or sources') or
    # since found not to shape the stage.
    ignored = ignored_fields(config, stage) + (evaluated_only(config) if evaluating else ())
    recorded = {**{k: v for k, v in ADDED_FIELDS.items() if k in current},
                **{k: v for k, v in recorded.items() if not is_in(k, ignored)}}
    # SHAPING_FOR fields an older record lacks: the value it ran with is unknown.
    current = {k: v for k, v in current.items() if not is_in(k, ignored)
               and (k in recorded or k not in shaping_fields(config, stage))}
    if data_digest is None:  # a check before the data is loaded
      recorded = {k: v for k, v in recorded.items() if k != 'data.digest'}
    # before the models are loaded, or a record older than their digests
    checked = [k for k in CONTENT_DIGESTS if contents is not None and k in recorded]
    recorded, current = ({k: v for k, v in fields.items()
                          if k not in CONTENT_DIGESTS or k in checked}
                         for fields in (recorded, current))
    changed = differences(recorded, current)
    if changed:
      raise ConfigError(
          f'stage {stage!r} in {directory} was '
          + ('trained' if saved else 'started')
          + ' with other values: '
          + '; '.join(changed) + ('. Evaluate it with the values it was trained with, or '
                                  'point --workdir at the run trained with yours'
                                  if evaluating else
                                  '. Rerun with the old values, use another --workdir, or '
                                  f'delete {directory} (and the folders of the stages that '
                                  'start from it) to train it again'))
    epochs = lookup(config, f'{SECTIONS.get(stage, stage)}.epochs')
    changed = differences(ran_with, {f: lookup(config, f) for f in ran_with})
    if not evaluating and saved and saved[-1] < epochs and changed:
      # a stage runs with one set of values, which its record names (results.json's
      # trained_with, once it is finished and kept)
      raise ConfigError(
          f'stage {stage!r} in {directory} stopped at epoch {saved[-1]} of {epochs} and ran '
          'with other values: ' + '; '.join(changed) + '. Resume it with those, or delete '
          f'{directory} to train it again')


def data_digest(dataset) -> str:
  """A short SHA-256 of a dataset's images and labels (both splits): a rerun over other
  data, e.g. an image folder whose files changed, is not taken for the same run."""
  digest = hashlib.sha256()
  for array in dataset[:4]:
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def record_stage(config, directory: str, stage: str, data_digest: str | None = None,
                 run_values: dict | None = None, *, contents: dict | None = None) -> None:
  """Writes the fields that shape `stage` (and the digests of the data and of what its path
  fields name, `contents`: `stage_fields`) into its folder before it trains, with
  `run_values` ({dotted field: value} that shape none of its weights but how its run
  computed and evaluated it: `recorded_values`). The run values of a run stopped
  before its first checkpoint, which trained nothing, are replaced by the next run's; its
  fields are checked as any folder's (`check_workdir`), since what the stage prepared
  before (a clean-label attack's training set) is kept there."""
  record = os.path.join(directory, FINGERPRINT)
  if jax.process_index() != 0 or ckpt_lib.finished_epochs(directory):
    return
  os.makedirs(directory, exist_ok=True)
  tmp = record + '.tmp'
  with open(tmp, 'w') as f:
    json.dump({'stage': stage, 'fields': stage_fields(config, stage, data_digest,
                                                      contents=contents),
               'ran_with': run_values or {}}, f, indent=1, allow_nan=False)
  os.replace(tmp, record)


def recorded_values(directory: str) -> dict:
  """The `run_values` that `record_stage` wrote into `directory` ({} where it has none)."""
  try:
    with open(os.path.join(directory, FINGERPRINT)) as f:
      return dict(json.load(f).get('ran_with') or {})
  except (OSError, ValueError, AttributeError):
    return {}
