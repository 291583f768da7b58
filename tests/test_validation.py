"""Every config rule, in-process: a bad value of each field is one ConfigError naming it."""

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from configs import table1, tiny
from nad_jax import checkpoint, defaults, validation
from nad_jax.experiments import table1 as table1_runner

NOT_A_FILE = '/nonexistent/model.pth'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # an existing folder


def mark_trained(directory) -> None:
  """Makes `directory` hold a finished epoch 1, as orbax marks one: a folder with nothing
  trained is not checked."""
  os.makedirs(os.path.join(directory, '1'))
  open(os.path.join(directory, '1', checkpoint.COMMITTED), 'w').close()


# (field, bad value, other fields to set first), one case per rule at least.
CASES = [
    ('seed', -1, {}), ('seed', 2, {'seeds': (0, 1)}), ('seeds', (1, 1), {}),
    ('runner', 'nosuch', {}), ('runner', 'table1', {}),  # no table section
    ('eval_only', 'yes', {}),
    ('scan_epoch', 'auto', {}), ('compilation_cache', None, {}),
    ('distributed.enabled', 1, {}), ('distributed.enabled', False, {'distributed.process_id': 0}),
    ('distributed.coordinator_address', 'localhost', {}),
    ('distributed.coordinator_address', 'host:70000', {}),
    ('distributed.num_processes', 0, {}), ('distributed.process_id', -1, {}),
    ('distributed.process_id', 2, {'distributed.num_processes': 2}),
    ('distributed.local_device_ids', (0, 0), {}), ('distributed.initialization_timeout', 0, {}),
    ('distributed.heartbeat_timeout', 2.5, {}),
    ('model.name', 'resnet999', {}), ('model.dtype', 'float16', {}),
    ('model.conv', 'cudnn', {}), ('model.conv', 'onednn', {}),  # the tests' 4 forced devices
    ('model.mean', (0.5, 0.5), {'model.std': (0.2, 0.2)}),
    ('model.std', (0.0, 0.2, 0.2), {'model.mean': (0.5, 0.5, 0.5)}),
    ('model.std', None, {'model.mean': (0.5, 0.5, 0.5)}),
    ('model.std', (0.2,), {'model.mean': (0.5, 0.5, 0.5)}),
    ('data.source', 'csv', {}), ('data.name', '', {'data.source': 'tfds'}),
    ('data.data_dir', 5, {'data.source': 'tfds'}),
    ('data.path', '/nonexistent/cifar', {'data.source': 'folder'}),
    ('data.train_size', 0, {}), ('data.test_size', 0, {}), ('data.num_classes', 1, {}),
    ('data.textures_per_class', 0, {}), ('data.seed', -1, {}), ('data.clean_fraction', 0.0, {}),
    ('data.clean_fraction', 1.5, {}), ('data.eval_batch_size', 0, {}),
    ('data.eval_batch_size', 6, {}),
    ('attack.name', 'nosuchattack', {}), ('attack.target_label', -1, {}),
    ('attack.poison_rate', 1.5, {}), ('attack.poison_rate', float('nan'), {}),
    ('attack.mode', 'one_to_one', {}), ('attack.seed', -3, {'attack.name': 'blend'}),
    ('attack.clean_label', 'no', {}),
    ('attack.pattern_path', NOT_A_FILE, {'attack.name': 'blend'}),
    ('attack.pattern', 'circle', {}), ('attack.size', 0, {}), ('attack.corner', 'middle', {}),
    ('attack.alpha', 0.0, {'attack.name': 'blend'}), ('attack.alpha', 1.5, {'attack.name': 'sig'}),
    ('attack.delta', 0.0, {'attack.name': 'sig'}),
    ('attack.frequency', -1.0, {'attack.name': 'sig'}),
    ('attack.sig_mode', 'mul', {'attack.name': 'sig'}),
    ('attack.amplitude', 300.0, {'attack.name': 'cl'}),
    ('attack.amplitude', 0.0, {'attack.name': 'cl'}),
    ('attack.pgd_eps', -1.0, {'attack.name': 'cl'}), ('attack.pgd_step', 0.0, {'attack.name': 'cl'}),
    ('attack.pgd_steps', -1, {'attack.name': 'cl'}),
    ('attack.surrogate.model', 'x', {'attack.name': 'cl'}),
    ('attack.surrogate.epochs', 0, {'attack.name': 'cl'}),
    ('attack.surrogate.batch_size', 6, {'attack.name': 'cl'}),
    ('attack.surrogate.learning_rate', 0.0, {'attack.name': 'cl'}),
    ('attack.surrogate.lr_boundaries', (5, 2), {'attack.name': 'cl'}),
    ('attack.surrogate.crop_flip', 'y', {'attack.name': 'cl'}),
    ('attack.trojan_neurons', 0, {'attack.name': 'trojan'}),
    ('attack.trojan_steps', 0, {'attack.name': 'trojan'}),
    ('attack.reflections', 0, {'attack.name': 'refool'}),
    ('attack.reflection_source', 'pascal', {'attack.name': 'refool'}),
    ('attack.selection_rounds', -1, {'attack.name': 'refool'}),
    ('attack.reflection_candidates', 0, {'attack.name': 'refool'}),
    ('attack.selection_holdout', 0, {'attack.name': 'refool'}),
    ('attack.surrogate.epochs', 0, {'attack.name': 'refool'}),
    ('attack.ghost_rate', 2.0, {'attack.name': 'refool'}),
    ('attack.reflection_strength', (0.5, 0.1), {'attack.name': 'refool'}),
    ('attack.warp_k', 1, {'attack.name': 'wanet'}),
    ('attack.warp_strength', 0.0, {'attack.name': 'wanet'}),
    ('attack.cross_ratio', -1.0, {'attack.name': 'wanet'}),
    ('attack.path', NOT_A_FILE, {'attack.name': 'files', 'student.checkpoint': ROOT}),
    ('student.checkpoint', None, {'attack.name': 'files', 'attack.path': ROOT}),
    ('student.checkpoint', NOT_A_FILE, {}), ('teacher.checkpoint', NOT_A_FILE, {}),
    ('teacher.source', 'pretrained', {}),
    ('nad.layers', ('group1', 3), {}), ('nad.betas', (1.0, 2.0), {}),
    ('nad.betas', (500.0, -1.0, 1000.0), {}), ('nad.p', 0.0, {}),
    ('fp.holdout_fraction', 1.0, {}), ('fp.acc_drop', -1.0, {}), ('mcr.t', 2.0, {}),
    ('mcr.points', 1, {}), ('mcr.lr_boundaries', (5,), {}),
    ('mcr.samples_per_epoch', -1, {}), ('table.attacks', ('nosuch',), {}),
    ('table.attacks', (), {}), ('table.attacks', ('badnets', 'badnets'), {}),
    ('table.defenses', ('xx',), {}), ('table.figures', 'y', {}),
    ('table.attention_images', -1, {}),
]
STAGE_FIELDS = [('epochs', -1), ('batch_size', 0), ('learning_rate', 0.0),
                ('lr_boundaries', (3, 1)), ('lr_decay', 0.0), ('momentum', 1.0),
                ('nesterov', 'y'), ('weight_decay', -1.0), ('crop_flip', 'y'), ('cutout', -1),
                ('eval_every', 0), ('lr_schedule', 'linear')]
for _stage in ('backdoor_training', 'teacher', 'nad', 'fp', 'mcr'):
  CASES += [(f'{_stage}.{name}', value, {}) for name, value in STAGE_FIELDS]
  CASES += [(f'{_stage}.lr_boundaries', (5,), {f'{_stage}.lr_schedule': 'cosine'})]


def base_config(field: str):
  """A valid config that has `field`, as an untyped ConfigDict so any value can be set."""
  config = table1.get_config() if field.split('.')[0] in ('fp', 'mcr', 'table') else \
      tiny.get_config()
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def assign(config, field: str, value) -> None:
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def test_every_rule_has_a_case():
  assert {rule.field for rule in validation.RULES} <= {field for field, _, _ in CASES}


def test_the_base_configs_are_valid():
  validation.validate(tiny.get_config())
  validation.validate(table1.get_config())


@pytest.mark.parametrize('field,value,setup', CASES, ids=[f'{c[0]}={c[1]!r}' for c in CASES])
def test_a_bad_value_names_its_field_and_what_is_allowed(field, value, setup):
  config = base_config(field)
  for other, other_value in setup.items():
    assign(config, other, other_value)
  assign(config, field, value)
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  message = str(error.value)
  assert message.startswith(f'{field} ') and ': must be ' in message, message
  assert '\n' not in message


def test_a_table_runs_with_its_runner():
  """configs/table1.py's table with runner 'nad' would run its base config's attack alone
  and record a table that never ran."""
  config = table1.get_config()
  config.runner = 'nad'
  with pytest.raises(validation.ConfigError, match="runner 'nad': must be 'table1' where the "
                     'config has a table section'):
    validation.validate(config)


def test_data_rules():
  config = tiny.get_config()
  labels = np.arange(20) % 10
  validation.validate_data(config, 10, 512, 128, labels)
  with pytest.raises(validation.ConfigError, match=r'attack.target_label 5: must be in \[0, 3\)'):
    validation.validate_data(config, 3, 512, 128, labels % 3)
  with pytest.raises(validation.ConfigError, match='teacher.batch_size 32: must be at most the 16'):
    validation.validate_data(config, 10, 512, 16, labels)
  with pytest.raises(validation.ConfigError, match='every test image is of the target class'):
    validation.validate_data(config, 10, 512, 128, np.full(20, 5))
  config.attack.mode = 'all_to_all'  # every test image then has another backdoor label
  validation.validate_data(config, 10, 512, 128, np.full(20, 5))


def test_an_attack_that_poisons_nothing_is_an_error_but_rate_zero_is_a_clean_model():
  config = tiny.get_config()
  with pytest.raises(validation.ConfigError,
                     match=re.escape('attack.poison_rate 0.1 with attack.target_label 5 '
                                     'poisons 0 of the 0')):
    validation.validate_poisoning(config, 0, 0)
  config.attack.poison_rate = 0.0
  validation.validate_poisoning(config, 0, 512)


def test_stage_fields_ignore_what_does_not_shape_the_stage():
  config = tiny.get_config()
  backdoored = validation.stage_fields(config, 'backdoored')
  assert 'attack.target_label' in backdoored and 'seed' in backdoored
  assert not any(k.startswith(('nad.', 'teacher.')) for k in backdoored)
  assert 'backdoor_training.eval_every' not in backdoored
  assert 'data.eval_batch_size' not in backdoored and 'model.conv' not in backdoored
  assert 'nad.betas' in validation.stage_fields(config, 'nad')
  assert 'nad.betas' not in validation.stage_fields(config, 'ft')


def test_a_record_leaves_out_the_fields_only_other_attacks_read(tmp_path):
  """A BadNets stage does not depend on Refool's fields: a folder recorded before they existed
  (or with other values of them) resumes; a Refool stage recorded without them does not."""
  config = tiny.get_config()
  fields = validation.stage_fields(config, 'backdoored')
  assert 'attack.reflection_source' not in fields and 'attack.warp_k' not in fields
  old = {**fields, 'attack.warp_k': 9}  # a record that listed every attack's fields
  os.makedirs(tmp_path / 'backdoored')
  with open(tmp_path / 'backdoored' / validation.FINGERPRINT, 'w') as f:
    json.dump({'stage': 'backdoored', 'fields': old}, f)
  mark_trained(tmp_path / 'backdoored')
  validation.check_workdir(config, str(tmp_path), ['backdoored'])

  config.attack.name = 'refool'
  refool_fields = validation.stage_fields(config, 'backdoored')
  assert refool_fields['attack.reflection_source'] == 'natural'
  without = {k: v for k, v in refool_fields.items() if k != 'attack.reflection_source'}
  with open(tmp_path / 'backdoored' / validation.FINGERPRINT, 'w') as f:
    json.dump({'stage': 'backdoored', 'fields': without}, f)
  with pytest.raises(validation.ConfigError,
                     match=r"attack.reflection_source '\(unset\)' -> 'natural'"):
    validation.check_workdir(config, str(tmp_path), ['backdoored'])


UNREAD = [  # (attack, a field it does not read, a value other than the default)
    ('badnets', 'attack.alpha', 0.5), ('badnets', 'attack.pattern_path', ROOT),
    ('blend', 'attack.size', 5), ('sig', 'attack.warp_k', 6),
    ('trojan', 'attack.surrogate.epochs', 3),  # Trojan reads the surrogate's model alone
    ('wanet', 'attack.reflection_strength', (0.3, 0.6)), ('cl', 'attack.delta', 30.0)]


@pytest.mark.parametrize('attack,field,value', UNREAD, ids=[f'{a}:{f}' for a, f, _ in UNREAD])
def test_a_field_the_attack_does_not_read_is_refused(attack, field, value):
  """Set away from its default, a field the attack ignores would silently change nothing."""
  config = base_config(field)
  config.attack.name = attack
  assign(config, field, value)
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  assert str(error.value).startswith(f'{field} {value!r}: the {attack} attack does not read it')
  config.attack.name = next(r.when.names[0] for r in validation.RULES if r.field == field)
  validation.validate(config)  # the attack that reads it takes it


def test_an_unread_field_at_its_default_is_accepted():
  config = base_config('attack.reflection_strength')
  assign(config, 'attack.reflection_strength', [0.05, 0.45])  # the default, as JSON gives it
  validation.validate(config)


def test_a_tables_attack_field_reaches_the_attacks_that_read_it(tmp_path):
  """In a comparison table a top-level attack field reaches the attacks that read it (Blend's
  alpha in a BadNets and Blend table); the others run and record the paper's default. One
  that no attack of the table reads is refused."""
  config = table1.get_config('badnets,blend')
  config.attack.alpha = 0.5
  configs = table1_runner.attack_configs(config, str(tmp_path))
  assert configs['blend'].attack.alpha == 0.5 and configs['badnets'].attack.alpha == 0.2
  config = table1.get_config('badnets,blend')
  config.attack.warp_k = 3
  with pytest.raises(validation.ConfigError, match=re.escape(
      "attack.warp_k 3: no attack of table.attacks ('badnets', 'blend') reads it (only wanet "
      'does); leave it at 4')):
    table1_runner.attack_configs(config, str(tmp_path))
  config = table1.get_config('blend')
  config.attack.alpha = 0.5
  assert table1_runner.attack_configs(config, str(tmp_path))['blend'].attack.alpha == 0.5


UNREAD_DATA = [  # (source, a field it does not read, a value other than the default)
    ('folder', 'data.train_size', 100), ('folder', 'data.test_size', 50),
    ('folder', 'data.seed', 1), ('tfds', 'data.num_classes', 5),
    ('tfds', 'data.textures_per_class', 2), ('synthetic', 'data.path', ROOT),
    ('synthetic', 'data.name', 'mnist'), ('folder', 'data.data_dir', ROOT)]


def data_config(source: str, field: str, value):
  """The paper's config reading `source` (an existing folder for 'folder'), `field` set."""
  config = defaults.paper_config()
  config.data.source = source
  if source == 'folder':
    config.data.path = ROOT
  assign(config, field, value)
  return config


@pytest.mark.parametrize('source,field,value', UNREAD_DATA,
                         ids=[f'{s}:{f}' for s, f, _ in UNREAD_DATA])
def test_a_field_the_data_source_does_not_read_is_refused(source, field, value):
  """main.py would load every image of the folder (or tfds builder) and still record the
  synthetic set's train_size; a path beside the synthetic source would change nothing."""
  with pytest.raises(validation.ConfigError) as error:
    validation.refuse_unread_fields(data_config(source, field, value), 'data', (field,))
  assert str(error.value).startswith(f'{field} {value!r}: the {source} source does not read it')
  assert str(error.value).endswith('leave it out')
  reader = next(r.when.names[0] for r in validation.RULES if r.field == field)
  config = data_config(reader, field, value)
  validation.validate(config)  # the source that reads it takes it
  validation.refuse_unread_fields(config, 'data', (field,))


def test_a_config_files_synthetic_sizes_do_not_block_another_source():
  """configs/table1.py (the quickstart's 5,000 synthetic images) over an image folder: the
  file's sizes are left unread, and only a size the user sets is refused."""
  config = table1.get_config()
  config.data.source, config.data.path = 'folder', ROOT
  validation.validate(config)
  validation.refuse_unread_fields(config, 'data', ('data.source', 'data.path'))
  with pytest.raises(validation.ConfigError,
                     match='data.train_size 5000: the folder source does not read it'):
    validation.refuse_unread_fields(config, 'data', ('data.path', 'data.train_size'))


def test_a_folder_stage_does_not_depend_on_the_synthetic_sizes(tmp_path):
  """A stage trained on an image folder is reused under another config file whose
  synthetic sizes differ (the folder source reads none of them), also where its record was
  written listing them."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  small, large = tiny.get_config(), quickstart.get_config()
  for config in (small, large):
    config.data.source, config.data.path = 'folder', ROOT
  assert 'data.train_size' not in validation.stage_fields(small, 'backdoored')
  directory = tmp_path / 'backdoored'
  validation.record_stage(small, str(directory), 'backdoored', 'digest')
  mark_trained(directory)
  for field, value in validation.stage_fields(small, 'backdoored').items():  # the same run
    assign(large, field, tuple(value) if isinstance(value, list) else value)
  validation.check_workdir(large, str(tmp_path), ('backdoored',), 'digest')
  record = directory / validation.FINGERPRINT
  written = json.loads(record.read_text())
  written['fields']['data.train_size'] = small.data.train_size  # as earlier versions wrote
  record.write_text(json.dumps(written))
  validation.check_workdir(large, str(tmp_path), ('backdoored',), 'digest')


def test_fp_is_the_same_stage_whether_it_follows_nad_or_sets_its_own(tmp_path):
  """FP's record holds the values its fields had (followed from nad or set): the same FP
  run under `nad.epochs=1` (followed) or `fp.epochs=1` (set) is one stage."""
  followed = defaults.defense_stages(tiny.get_config())
  followed.nad.epochs = 1
  validation.record_stage(followed, str(tmp_path / 'fp'), 'fp', 'digest')
  mark_trained(tmp_path / 'fp')
  set_itself = defaults.defense_stages(tiny.get_config())
  set_itself.fp.epochs = 1
  validation.check_workdir(set_itself, str(tmp_path), ('fp',), 'digest')
  set_itself.fp.epochs = 2
  with pytest.raises(validation.ConfigError, match=r"stage 'fp' .*fp\.epochs 1 -> 2"):
    validation.check_workdir(set_itself, str(tmp_path), ('fp',), 'digest')


def test_a_table_with_figures_needs_matplotlib(monkeypatch):
  """Without the plots extra the table is refused before it trains, not after its first
  attack."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  config = table1.get_config('badnets')
  validation.validate(config)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'matplotlib' else find_spec(name, *args))
  with pytest.raises(validation.ConfigError, match=r"^table.figures True: must be False where "
                     r"matplotlib is not installed \(pip install '.\[plots\]'"):
    validation.validate(config)
  config.eval_only = True  # an evaluation draws no figures
  validation.validate(config)
  config.eval_only, config.table.figures = False, False
  validation.validate(config)
