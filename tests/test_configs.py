"""What a run records is what it ran: one definition per attack variant, overrides that
reach every stage they shape (or are refused), variants refused with one message.

The whole-run check (main.py on a cut-down BackdoorBench variant) is marked slow; the rest
build configs only. tests/test_defenses.py runs the tiny table through main.py and checks
its table1.json and its eval-only mode.
"""

import json
import os

import pytest

import nad_jax
from configs import ablations, backdoorbench, nad_cifar, nad_official, quickstart, table1, tiny
from nad_jax import defaults, validation
from nad_jax.experiments import table1 as table
from tests.main_in_process import run_main

# The sections that shape a stage (validation.STAGE_SECTIONS) and the defenses' own.
SHAPING = ('seed', 'data', 'model', 'attack', 'backdoor_training', 'student', 'teacher', 'nad',
           'fp', 'mcr')


def shaping(config, drop_eval_every: bool) -> dict:
  """The config's shaping sections as a dict; `eval_every` (which shapes nothing, and
  which configs/table1.py sets to 2 on the quickstart data) left out where asked."""
  def strip(tree):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in tree.items()
            if not (drop_eval_every and k == 'eval_every')}
  as_dict = config.to_dict()
  return strip({k: as_dict[k] for k in SHAPING})


def with_defenses(config):
  defaults.defense_stages(config)
  return config.copy_and_resolve_references()


@pytest.mark.parametrize('variant', defaults.ATTACK_VARIANTS)
def test_a_table_row_runs_what_its_base_config_runs(variant):
  """configs/table1.py:X runs configs/quickstart.py:X, and :cifar,X configs/nad_cifar.py:X,
  for every section that shapes a stage (FP follows NAD in both; MCR's curve is shortened on
  the quickstart's data by configs/table1.py's `quickstart_mcr`)."""
  ran = table.attack_config(table1.get_config('all'), variant)
  base = table1.quickstart_mcr(with_defenses(quickstart.get_config(variant)))
  assert shaping(ran, True) == shaping(base, True)
  ran = table.attack_config(table1.get_config('cifar,all'), variant)
  assert shaping(ran, False) == shaping(with_defenses(nad_cifar.get_config(variant)), False)


@pytest.mark.parametrize('variant', defaults.ATTACK_VARIANTS)
def test_the_apis_attack_variant_is_the_configs(variant):
  """The Python API's attack=X selects the attack of configs/nad_cifar.py:X (CL's surrogate
  included), whose base is the API's paper config."""
  assert (nad_jax.make_config(attack=variant).attack.to_dict()
          == nad_cifar.get_config(variant).attack.to_dict())


@pytest.mark.parametrize('variant', backdoorbench.VARIANTS)
def test_a_backdoorbench_table_row_runs_what_its_config_runs(variant):
  """configs/table1.py:backdoorbench,X runs configs/backdoorbench.py:X."""
  ran = table.attack_config(table1.get_config('backdoorbench,all'), variant)
  assert shaping(ran, False) == shaping(with_defenses(backdoorbench.get_config(variant)), False)


def test_nad_schedule_reaches_fp_and_mcr_keeps_its_own_recipe():
  config = table1.get_config('badnets,refool')
  config.nad.epochs = 1
  config.mcr.samples_per_epoch = 500
  for attack in ('badnets', 'refool'):
    ran = table.attack_config(config, attack)
    assert ran.nad.epochs == ran.fp.epochs == 1 and ran.fp.batch_size == ran.nad.batch_size
    # Zhao et al.'s curve recipe (nad_jax/defenses/mcr.py), whatever NAD's schedule; on the
    # quickstart's data at its batch size
    assert (ran.mcr.epochs, ran.mcr.batch_size, ran.mcr.learning_rate, ran.mcr.lr_schedule,
            ran.mcr.momentum, ran.mcr.nesterov, ran.mcr.weight_decay, ran.mcr.crop_flip) == (
                100, 64, 0.01, 'curve', 0.9, False, 1e-4, False)
    assert ran.mcr.samples_per_epoch == 500
  assert defaults.defense_stages(quickstart.get_config()).mcr.samples_per_epoch == 10_000
  assert (table1.get_config('cifar').mcr.samples_per_epoch,
          table1.get_config('cifar').mcr.batch_size) == (10_000, 128)
  assert table1.get_config().mcr.samples_per_epoch == 0
  assert table.attack_config(config, 'refool').fp.batch_size == 16  # refool's own NAD batch
  config.fp.epochs = 3  # a defense's own field changes that defense only
  assert (config.fp.epochs, config.nad.epochs, config.mcr.epochs) == (3, 1, 100)


def test_an_override_an_attack_shadows_is_refused_with_the_per_attack_field():
  config = table1.get_config()  # badnets, blend; blend's teacher trains at batch 16
  config.teacher.batch_size = 8
  with pytest.raises(validation.ConfigError) as error:
    table.check_overrides(config, ('teacher.batch_size',))
  message = str(error.value)
  assert message.startswith('teacher.batch_size 8: set per attack by blend')
  assert '--config.table.attack_configs.blend.teacher.batch_size=8' in message
  table.check_overrides(config, ('nad.epochs', 'attack.poison_rate', 'data.train_size'))
  with pytest.raises(validation.ConfigError, match='set per attack by badnets, blend'):
    table.check_overrides(config, ('attack.name',))
  config.table.attacks = ('badnets',)
  table.check_overrides(config, ('teacher.batch_size',))  # no attack of this table sets it


def test_a_table_of_fp_alone_refuses_what_fp_does_not_read():
  """FP follows NAD's schedule but for the fields it sets itself, and reads no other NAD
  field: a table whose one training defense is FP refuses the others."""
  config = table1.get_config('badnets')
  config.table.defenses = ('none', 'fp')
  config.nad.epochs = 3
  table.check_overrides(config, ('nad.epochs',))  # FP follows it
  config.fp.epochs = 1
  with pytest.raises(validation.ConfigError, match=r"^nad.epochs 3: table.defenses \('none', "
                     r"'fp'\): FP, its one defense that trains, does not read it"):
    table.check_overrides(config, ('nad.epochs', 'fp.epochs'))
  config.nad.weight_decay = 0.5
  with pytest.raises(validation.ConfigError, match='^nad.weight_decay 0.5: '):
    table.check_overrides(config, ('nad.weight_decay',))


def test_a_per_attack_field_the_config_lacks_is_named():
  config = table1.get_config('badnets')
  with config.table.attack_configs.badnets.attack.unlocked():
    config.table.attack_configs.badnets.attack.strength = 2.0
  with pytest.raises(validation.ConfigError,
                     match=r'^table.attack_configs.badnets.attack.strength: the config has no'):
    table.attack_config(config, 'badnets')


CONFIG_FILES = {'configs/tiny.py': tiny, 'configs/quickstart.py': quickstart,
                'configs/nad_cifar.py': nad_cifar, 'configs/nad_official.py': nad_official,
                'configs/ablations.py': ablations, 'configs/table1.py': table1,
                'configs/backdoorbench.py': backdoorbench}


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_config_file_refuses_an_unknown_variant(path):
  with pytest.raises(ValueError) as error:
    CONFIG_FILES[path].get_config('nosuch')
  message = str(error.value)
  assert path in message and 'nosuch' in message and '\n' not in message


def test_all_stands_alone():
  with pytest.raises(ValueError, match="'all' stands alone"):
    table1.get_config('all,badnets')
  assert table1.get_config('cifar,all').table.attacks == defaults.ATTACK_VARIANTS
  assert table1.get_config('backdoorbench,all').table.attacks == backdoorbench.VARIANTS
  with pytest.raises(ValueError, match="no attack 'trojan' on backdoorbench"):
    table1.get_config('backdoorbench,trojan')
  with pytest.raises(ValueError, match='one base'):
    table1.get_config('cifar,backdoorbench,badnets')


# ------------------------------------------------------- BackdoorBench's setting (its files)

def test_backdoorbench_variants_validate_and_hold_its_settings():
  """SCLBD/BackdoorBench: config/attack/prototype/cifar10.yaml, config/attack/*/default.yaml,
  config/defense/nad/cifar10.yaml and defense/nad.py (configs/backdoorbench.py cites them)."""
  configs = {v: backdoorbench.get_config(v) for v in backdoorbench.VARIANTS}
  assert backdoorbench.get_config().to_dict() == configs['badnets'].to_dict()
  for variant, config in configs.items():
    validation.validate(config)
    assert (config.model.name, config.attack.name, config.attack.target_label,
            config.data.clean_fraction) == ('preact_resnet18', variant, 0, 0.05)
    assert config.model.std == (0.247, 0.243, 0.261)
    bd, teacher, nad = config.backdoor_training, config.teacher, config.nad
    assert (bd.epochs, bd.batch_size, teacher.epochs, teacher.batch_size, nad.epochs,
            nad.batch_size) == (100, 128, 10, 256, 10, 256)
    for stage in (bd, teacher, nad):
      assert (stage.learning_rate, stage.lr_boundaries, stage.momentum, stage.nesterov,
              stage.weight_decay, stage.crop_flip, stage.cutout) == (0.01, (), 0.9, False,
                                                                     5e-4, True, 0)
    assert bd.lr_schedule == ('step' if variant == 'wanet' else 'cosine')
    assert (nad.betas, nad.p, nad.layers) == ((500.0, 1000.0, 1000.0), 2.0, None)
    assert config.attack.poison_rate == (0.5 if variant == 'sig' else 0.1)
  attacks = {v: c.attack for v, c in configs.items()}
  assert (attacks['badnets'].pattern, attacks['badnets'].size,
          attacks['badnets'].corner) == ('square', 3, 'bottom_right')
  assert attacks['blend'].alpha == 0.2
  assert (attacks['sig'].delta, attacks['sig'].frequency, attacks['sig'].sig_mode) == (
      40.0, 6.0, 'add')
  assert (attacks['wanet'].warp_k, attacks['wanet'].warp_strength,
          attacks['wanet'].cross_ratio) == (4, 0.5, 2.0)


def test_ablation_default_fraction_is_the_quickstart():
  assert ablations.get_config('fraction_0.05').to_dict() == quickstart.get_config().to_dict()
  assert ablations.get_config().to_dict() == quickstart.get_config().to_dict()
  small = ablations.get_config('fraction_0.01')  # 50 clean images: not two batches of 64
  assert small.teacher.batch_size == small.nad.batch_size == 16
  for fraction in ('0.1', '0.2'):
    config = ablations.get_config(f'fraction_{fraction}')
    assert config.teacher.batch_size == config.nad.batch_size == 64


# ------------------------------------------------------------------- main.py's config path

def test_main_refuses_a_shadowed_override(tmp_path):
  workdir = tmp_path / 'table'
  error = run_main(['--config=configs/table1.py', f'--workdir={workdir}',
                    '--config.teacher.batch_size=8'])
  assert error.startswith('error: teacher.batch_size 8: set per attack by blend'), error
  assert '--config.table.attack_configs.blend.teacher.batch_size=8' in error
  assert not workdir.exists()


@pytest.mark.slow
def test_main_runs_a_backdoorbench_variant_cut_down(tmp_path):
  """configs/backdoorbench.py:sig through main.py: tiny net, synthetic data, 1 epoch a stage."""
  workdir = str(tmp_path / 'bb')
  args = ['--config=configs/backdoorbench.py:sig', f'--workdir={workdir}',
          '--config.model.name=tiny', '--config.data.source=synthetic',
          '--config.data.train_size=512', '--config.data.test_size=256',
          '--config.data.clean_fraction=0.25', '--config.data.eval_batch_size=128',
          *(f'--config.{stage}.{field}' for stage in ('backdoor_training', 'teacher', 'nad')
            for field in ('epochs=1', 'batch_size=32')), '--config.compilation_cache=']
  assert run_main(args) is None
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert {'backdoored', 'teacher', 'nad'} <= set(results['stages']), results.keys()
