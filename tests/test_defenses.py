"""Baseline defenses (FT, FP, MCR), the Table 1 runner and its figures, on tiny configs."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations, table1
from nad_jax import defaults
from nad_jax import data as data_lib
from nad_jax import checkpoint, models, stages, validation
from nad_jax import train as train_lib
from nad_jax.defenses import fine_pruning, mcr
from nad_jax.experiments import nad as nad_runner
from nad_jax.experiments import table1 as table
from tests import tiny_table
from tests.main_in_process import run_main

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_table_config(attacks=('badnets',)):
  """configs/table1.py shrunk (tests/tiny_table.py)."""
  config = table1.get_config(','.join(attacks))
  config.update_from_flattened_dict(tiny_table.OVERRIDES)
  return config


def table_args(workdir: str) -> list[str]:
  """main.py's flags for tiny_table_config() (no compilation cache folder of main.py's own:
  the tests' serves it)."""
  return ['--config=configs/table1.py:badnets', f'--workdir={workdir}', *tiny_table.flags(),
          '--config.compilation_cache=']


@pytest.fixture(scope='module')
def table_run(tmp_path_factory):
  """The tiny table as main.py runs it: (workdir, its table1.json)."""
  workdir = str(tmp_path_factory.mktemp('table'))
  assert run_main(table_args(workdir)) is None
  with open(os.path.join(workdir, 'table1.json')) as f:
    return workdir, json.load(f)


def test_table_end_to_end(table_run):
  workdir, saved = table_run
  for name in ('table1.md', 'table1.csv', 'table1.json'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  cells = saved['table']['badnets']
  assert set(cells) == {'none', 'ft', 'fp', 'mcr', 'nad'}
  for metrics in cells.values():
    assert set(metrics) == {'acc', 'acc_nontarget', 'asr', 'ra'}
    assert all(0 <= v <= 100 for v in metrics.values())
  assert saved['average']['nad'] == {k: round(v, 2) for k, v in cells['nad'].items()}
  with open(os.path.join(workdir, 'table1.md')) as f:
    text = f.read()
  assert '| badnets |' in text and '**Average**' in text
  for stage in ('backdoored', 'ft', 'fp', 'mcr', 'teacher', 'nad'):
    assert os.path.isdir(os.path.join(workdir, 'badnets', stage))
  for figure in saved['figures']:
    assert os.path.getsize(os.path.join(workdir, figure)) > 1000
  assert {os.path.basename(f) for f in saved['figures']} == {
      'badnets_defense_curves.png', 'badnets_attention.png', 'mcr_curves.png'}
  # MCR's figure is the curve at t = mcr.t, which ends the per-epoch history too.
  curve = saved['details']['badnets']['mcr']['curve']
  assert [c['t'] for c in curve] == [0.0, 0.3, 0.5, 1.0]
  last = saved['details']['badnets']['history']['mcr'][-1]
  assert {k: last[k] for k in cells['mcr']} == cells['mcr']
  # What ran is what is recorded: NAD's one-epoch schedule reached every defense.
  for stage in ('ft', 'fp', 'mcr', 'nad'):
    assert [h['epoch'] for h in saved['details']['badnets']['history'][stage]] == [0, 1]
    assert saved['config'][stage if stage != 'ft' else 'nad']['epochs'] == 1
  # Each attack's config as it ran: the table's with table.attack_configs.badnets laid over,
  # main.py's flags parsed as the overrides say.
  recorded = saved['details']['badnets']['config']
  config = tiny_table_config()
  config.compilation_cache = ''  # as table_args sets it
  assert recorded == json.loads(json.dumps(table.attack_config(config, 'badnets').to_dict()))
  assert (recorded['mcr']['batch_size'], recorded['mcr']['points']) == (32, 3)


def test_main_evaluates_the_table_again(table_run):
  """--config.eval_only=True restores every stage of every attack to the same table."""
  workdir, saved = table_run
  assert run_main([*table_args(workdir), '--config.eval_only=True']) is None
  with open(os.path.join(workdir, 'table1_eval.json')) as f:
    evaluated = json.load(f)
  assert evaluated['table'] == saved['table']
  assert set(evaluated['stages']['badnets']) == {'backdoored', 'ft', 'fp', 'mcr', 'teacher',
                                                 'nad'}


def test_table_refuses_overrides_no_run_reads():
  """SIG sets its own poison rate, so a top-level one would not reach its rows."""
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/table1.py:badnets,sig',
       '--workdir=/nonexistent/t', '--config.attack.poison_rate=0.5'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and ('error: attack.poison_rate 0.5: set per attack by sig'
                                     in result.stderr), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_table_rerun_trains_nothing(table_run):
  workdir, results = table_run
  config = tiny_table_config()
  config.table.figures = False
  first_every = results['config']['nad']['eval_every']
  config.nad.eval_every = first_every + 1  # shapes no stage: the stages it ran are kept
  again = table.run(config, workdir)
  assert again['table'] == results['table']
  # figures off: the first run's figures do not stay beside a table that lists none
  assert again['figures'] == [] and results['figures']
  assert not any(os.path.exists(os.path.join(workdir, f)) for f in results['figures'])
  for recorded in (again['config'], again['details']['badnets']['config']):  # this run's
    assert recorded['nad']['eval_every'] == first_every + 1
  # Nothing trained: the first run's timing is kept, and said to be, with the eval_every
  # the stages that train with nad's schedule ran with.
  assert again['timing'] == {**results['timing'], 'from_earlier_run': True}
  first, kept = results['details']['badnets'], again['details']['badnets']
  marked = lambda timing: {k: {**t, 'from_earlier_run': True} for k, t in timing.items()}
  assert kept['timing'] == marked(first['timing'])
  with_nad = {'nad': {'trained_with': {'nad.eval_every': first_every}},
              'ft': {'trained_with': {'nad.eval_every': first_every}},
              'fp': {'trained_with': {'fp.eval_every': first_every}}}  # FP follows nad's
  assert kept['stage_timing'] == {k: {**t, 'from_earlier_run': True, **with_nad.get(k, {})}
                                  for k, t in first['stage_timing'].items()}


def test_table_eval_only_refuses_an_unfinished_stage(table_run, tmp_path):
  """An interrupted stage's latest epoch is not its result: eval_only refuses it, and
  writes nothing."""
  workdir, _ = table_run
  copy = tmp_path / 'table'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('table1_eval.json'))
  shutil.rmtree(copy / 'badnets' / 'backdoored' / '2')
  config = tiny_table_config()
  config.eval_only = True
  with pytest.raises(stages.ConfigError, match=r"stage 'backdoored' of attack 'badnets' in "
                     r".* is unfinished \(no epoch saved\)"):
    table.evaluate_only(config, str(copy))
  assert not os.path.exists(copy / 'table1_eval.json')


def test_table_eval_only_evaluates_the_curve_at_another_t(table_run, tmp_path):
  """mcr.t picks a point on the trained curve: an evaluation-only run may pick another one
  (the curve is not trained again), and gives that point of the training run's curve."""
  workdir, saved = table_run
  copy = tmp_path / 'table'
  shutil.copytree(workdir, copy)
  config = tiny_table_config()
  config.eval_only = True
  config.mcr.t = 0.5
  evaluated = table.evaluate_only(config, str(copy))
  point = next(c for c in saved['details']['badnets']['mcr']['curve'] if c['t'] == 0.5)
  assert evaluated['table']['badnets']['mcr'] == {k: point[k] for k in stages.METRICS}
  assert evaluated['config']['mcr']['t'] == 0.5  # table1_eval.json says which point
  ran = saved['details']['badnets']['config']  # each attack's evaluation config, as it ran
  as_json = json.loads(json.dumps(evaluated['attack_configs']['badnets']))
  assert as_json == {**ran, 'eval_only': True, 'mcr': {**ran['mcr'], 't': 0.5},
                     'compilation_cache': config.compilation_cache}


def test_the_evaluation_batch_shapes_the_mcr_model(table_run, tmp_path):
  """MCR recomputes each curve point's BatchNorm statistics in evaluation batches: a
  training rerun may not change their size under a finished curve (its cell would no
  longer be the saved model's); an evaluation-only run may, and records it."""
  workdir, saved = table_run
  copy = tmp_path / 'table'
  shutil.copytree(workdir, copy)
  config = tiny_table_config()
  config.data.eval_batch_size = 64
  with pytest.raises(validation.ConfigError, match="stage 'mcr' .*data.eval_batch_size"):
    table.run(config, str(copy))
  config.eval_only = True
  evaluated = table.evaluate_only(config, str(copy))
  assert evaluated['config']['data']['eval_batch_size'] == 64
  assert evaluated['table']['badnets']['ft'] == saved['table']['badnets']['ft']


def test_a_table_checks_only_the_folders_of_its_defenses(table_run, tmp_path):
  """A table without MCR does not read the curve another table left in its workdir, so the
  curve's values (here its evaluation batch) do not stop it."""
  assert table.folders_of(('none', 'ft')) == ['backdoored', 'ft']
  assert table.folders_of(('none', 'mcr', 'nad')) == ['backdoored', 'teacher', 'nad', 'ft',
                                                       'mcr']
  workdir, _ = table_run
  config = tiny_table_config()
  config.data.eval_batch_size = 64  # shapes the finished curve in badnets/mcr
  with pytest.raises(validation.ConfigError, match="stage 'mcr'"):
    table.attack_configs(config, workdir)
  config.table.defenses = ('none', 'ft')
  assert list(table.attack_configs(config, workdir)) == ['badnets']


def test_a_curve_trained_again_is_evaluated_again(table_run, tmp_path):
  """The MCR cell is the curve at mcr.t: after the curve's folder is deleted and the curve
  trained anew (another lr), the cell and the recorded curve are the new curve's."""
  workdir, saved = table_run
  copy = tmp_path / 'table'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'badnets' / 'mcr')
  config = tiny_table_config()
  config.table.figures = False
  config.mcr.learning_rate = 50.0  # x0.01 in a 1-epoch curve schedule
  again = table.run(config, str(copy))
  trained = again['details']['badnets']['history']['mcr'][-1]  # the model at t, evaluated
  assert again['table']['badnets']['mcr'] == {k: trained[k] for k in stages.METRICS}
  assert again['table']['badnets']['mcr'] != saved['table']['badnets']['mcr']


def test_finetuning_is_nad_with_zero_betas(table_run, tmp_path):
  """FT of the table == the NAD stage of pipeline.run with betas 0, number for number."""
  workdir, results = table_run
  config = table.attack_config(tiny_table_config(), 'badnets')
  config.student.checkpoint = os.path.join(workdir, 'badnets', 'backdoored')
  config.teacher.epochs = 0
  config.nad.betas = (0.0, 0.0, 0.0)
  nad = nad_runner.run(config, str(tmp_path)).results
  ft = results['details']['badnets']['history']['ft']
  assert nad['history']['nad'] == ft


def test_table_over_seeds_gathers_runs_of_single_seeds(table_run, tmp_path):
  """A `seeds` table runs each seed as `--config.seed=S --workdir=DIR/seed_S` would: the
  module's seed-0 table, run alone, is resumed as seed 0 and not trained again, and each
  cell is the mean and sample std of the seeds' cells."""
  workdir, single = table_run
  shutil.copytree(workdir, tmp_path / 'seed_0')
  config = tiny_table_config()
  config.table.update(dict(defenses=('none', 'ft'), figures=False))
  config.seeds = (0, 1)
  results = table.run(config, str(tmp_path))
  per_seed = {}
  for seed in (0, 1):
    with open(tmp_path / f'seed_{seed}' / 'table1.json') as f:
      per_seed[seed] = json.load(f)
  trained = lambda seed: [name for name, t in per_seed[seed]['details']['badnets'][
      'stage_timing'].items() if t.get('img_per_s')]
  assert trained(1) == ['none', 'ft']
  # Seed 0 trained nothing: its table keeps what its own run measured of these defenses;
  # the total of a table with other defenses is this run's.
  first, kept = single['details']['badnets'], per_seed[0]['details']['badnets']
  assert kept['stage_timing'] == {d: {**first['stage_timing'][d], 'from_earlier_run': True}
                                  for d in ('none', 'ft')}
  assert kept['timing'] == {**{k: {**first['timing'][k], 'from_earlier_run': True}
                               for k in ('backdoored', 'ft')},
                            'total': kept['timing']['total']}
  assert 'from_earlier_run' not in kept['timing']['total']
  assert kept['timing']['total']['trained_nothing']  # this run's: it restored and evaluated
  assert per_seed[0]['table']['badnets'] == {d: single['table']['badnets'][d]
                                             for d in ('none', 'ft')}
  with open(tmp_path / 'table1.json') as f:
    saved = json.load(f)
  assert saved['seeds'] == [0, 1] and saved['table'] == results['table']
  for defense in ('none', 'ft'):
    values = [per_seed[s]['table']['badnets'][defense]['asr'] for s in (0, 1)]
    assert saved['table']['badnets'][defense]['asr'] == round(float(np.mean(values)), 2)
    assert saved['std']['badnets'][defense]['asr'] == round(float(np.std(values, ddof=1)), 2)
  with open(tmp_path / 'table1.md') as f:
    assert f'{saved["table"]["badnets"]["ft"]["asr"]:.2f} ± ' in f.read()
  evaluated = table.evaluate_only(config, str(tmp_path))  # restores each seed's stages
  assert evaluated['table'] == saved['table'] and evaluated['std'] == saved['std']
  # Other seeds than the table's are refused before any seed's evaluation is written.
  written = os.stat(tmp_path / 'seed_0' / 'table1_eval.json').st_mtime_ns
  for seeds in ((1,), (0, 2)):
    config.seeds = seeds
    with pytest.raises(stages.ConfigError, match=re.escape(f'seeds {seeds}: the table in ')
                       + r'.* ran seeds \(0, 1\)'):
      table.evaluate_only(config, str(tmp_path))
  (tmp_path / 'table1.json').unlink()  # a table whose seeds ran apart: a missing one is found
  with pytest.raises(stages.ConfigError, match="no checkpoint for stage 'backdoored'"):
    table.evaluate_only(config, str(tmp_path))
  assert os.stat(tmp_path / 'seed_0' / 'table1_eval.json').st_mtime_ns == written


def test_a_table_of_other_seeds_measures_its_own_total(tmp_path):
  """A rerun keeps the recorded total only for the same seeds: one seed of a two-seed
  table took less than the two."""
  path = tmp_path / 'table1.json'
  table_of = lambda seeds, wall: {'attacks': ['badnets'], 'defenses': ['none'], 'seeds': seeds,
                                  'timing': {'wall_s': wall}}
  path.write_text(json.dumps(table_of([0, 1], 34.3)))
  reran = [{'timing': {'total': {'wall_s': 9.0, 'from_earlier_run': True}}}]  # nothing trained
  assert table.kept_timing(str(path), table_of([1], 2.0), reran)['timing'] == {
      'wall_s': 2.0, 'trained_nothing': True}
  trained = [{'timing': {'total': {'wall_s': 9.0}}}]
  assert table.kept_timing(str(path), table_of([1], 2.0), trained)['timing'] == {'wall_s': 2.0}
  assert table.kept_timing(str(path), table_of([0, 1], 2.0), reran)['timing'] == {
      'wall_s': 34.3, 'from_earlier_run': True}


def test_the_average_over_seeds_is_the_average_of_the_table():
  """With one attack the Average row is that attack's row, digit for digit."""
  cells = lambda asr: {'badnets': {'ft': {'acc': 80.0, 'acc_nontarget': 79.0, 'asr': asr,
                                          'ra': 10.0}}}
  tables = {seed: {'table': cells(asr), 'average': table.average(cells(asr), ['ft'])}
            for seed, asr in ((0, 72.805), (1, 72.801), (2, 72.8))}
  gathered = table.over_seeds(tables)
  assert gathered['average'] == gathered['table']['badnets']


# ------------------------------------------------------------------------------ fine-pruning

@pytest.fixture(scope='module')
def tiny_model():
  model = models.build_model('tiny', 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  ds = data_lib.synthetic(0, 64, 32)
  return model, variables, ds


def test_pruning_ranks_channels_by_mean_activation(tiny_model):
  model, variables, ds = tiny_model
  normalize = train_lib.normalizer(None, None)
  head, features, logits = fine_pruning.head_features(model, variables, ds.train_images,
                                                      normalize, batch_size=24)
  assert head == 'fc' and features.shape == (64, 32)
  np.testing.assert_allclose(logits, model.apply(variables, normalize(
      jnp.asarray(ds.train_images, jnp.float32)), train=False), rtol=1e-5, atol=1e-5)
  kernel = np.asarray(variables['params']['fc']['kernel'])
  bias = np.asarray(variables['params']['fc']['bias'])
  labels = np.argmax(logits, -1)  # held-out 'labels': the unpruned model is 100% right
  plan = fine_pruning.prune_plan(features, features, labels, kernel, bias, acc_drop=30.0)
  activation = features.mean(axis=0)
  assert np.all(np.diff(activation[plan['order']]) >= 0)
  assert plan['holdout_acc'][0] == 100.0
  count = plan['pruned']
  assert 0 < count < 32
  assert min(plan['holdout_acc'][:count + 1]) >= 70.0
  assert count == 31 or plan['holdout_acc'][count + 1] < 70.0
  pruned = set(plan['order'][:count])
  assert np.max(activation[list(pruned)]) <= np.min(np.delete(activation, list(pruned)))
  assert set(np.flatnonzero(plan['keep'] == 0)) == pruned


def test_pruned_channels_are_removed(tiny_model):
  """The outputs do not depend on the pruned channels, in training and in inference."""
  model, variables, ds = tiny_model
  keep = np.ones(32, np.float32)
  pruned = [3, 7, 20]
  keep[pruned] = 0
  pruned_model = fine_pruning.PrunedModel(model, 'fc', keep)
  x = jnp.asarray(ds.train_images[:16], jnp.float32) / 255

  def changed(channels):
    """The final BN's scale and shift at `channels` replaced: only those channels change."""
    params = jax.tree.map(lambda v: v, variables['params'])
    bn = dict(params['bn'])
    bn['scale'] = bn['scale'].at[np.asarray(channels)].set(5.0)
    bn['bias'] = bn['bias'].at[np.asarray(channels)].set(3.0)
    return {**variables, 'params': {**params, 'bn': bn}}

  for train in (False, True):
    apply = lambda m, v: m.apply(v, x, train=train, mutable=['batch_stats'] if train else False)
    out = lambda m, v: apply(m, v)[0] if train else apply(m, v)
    base = out(pruned_model, variables)
    np.testing.assert_array_equal(out(pruned_model, changed(pruned)), base)
    assert not np.allclose(out(pruned_model, changed([4])), base)
    # The baked variables compute the same network with the plain model.
    baked = fine_pruning.mask_head(variables, 'fc', keep)
    np.testing.assert_allclose(out(model, baked), base, rtol=1e-6, atol=1e-6)
  # No gradient reaches the pruned rows: fine-tuning cannot bring them back.
  grads = jax.grad(lambda p: jnp.sum(pruned_model.apply({**variables, 'params': p}, x)))(
      variables['params'])
  assert np.all(np.asarray(grads['fc']['kernel'])[pruned] == 0)
  assert np.all(np.asarray(grads['bn']['scale'])[pruned] == 0)


def test_fine_pruned_model_keeps_channels_pruned(table_run):
  workdir, results = table_run
  info = results['details']['badnets']['fine_pruning']
  assert info['pruned'] == len(info['pruned_channels'])
  config = table.attack_config(tiny_table_config(), 'badnets')
  ctx = stages.setup(config, os.path.join(workdir, 'badnets'))
  from nad_jax import checkpoint as ckpt_lib
  fp = ckpt_lib.load_variables(os.path.join(workdir, 'badnets', 'fp'), ctx.abstract_variables)
  kernel = np.asarray(fine_pruning.mask_head(fp, 'fc', np.asarray(
      [0.0 if c in info['pruned_channels'] else 1.0 for c in range(info['channels'])]))[
          'params']['fc']['kernel'])
  assert np.all(kernel[info['pruned_channels']] == 0)


def test_a_rerun_prunes_the_channels_fp_was_trained_with(table_run, tmp_path, monkeypatch):
  """FP's ranking hangs on float rounding (convolutions, evaluation batches), so a run that
  restores the stage prunes what its folder's plan says, not what it would rank."""
  config = tiny_table_config()
  config.student.checkpoint = os.path.join(table_run[0], 'badnets', 'backdoored')
  config.table.defenses = ('none', 'fp')
  config.table.figures = False
  workdir = str(tmp_path / 'fp')
  first = table.run(config, workdir)['details']['badnets']
  ranked = fine_pruning.prune_plan

  def one_more_pruned(*args, **kwargs):  # as if rounding had moved the criterion's cut
    plan = ranked(*args, **kwargs)
    keep = plan['keep'].copy()
    keep[plan['order'][plan['pruned']]] = 0.0
    return {**plan, 'pruned': plan['pruned'] + 1, 'keep': keep}

  monkeypatch.setattr(fine_pruning, 'prune_plan', one_more_pruned)
  again = table.run(config, workdir)['details']['badnets']
  assert again['fine_pruning'] == first['fine_pruning']
  assert again['metrics']['fp'] == first['metrics']['fp']
  assert again['stage_timing']['fp']['from_earlier_run']
  plan = os.path.join(workdir, 'badnets', 'fp', fine_pruning.PLAN)
  with open(plan) as f:
    kept = json.load(f)
  for damaged in ('{"order": [1, 2', '"head keep order pruned holdout_acc"',
                  json.dumps({**kept, 'head': 'nosuch'}), json.dumps({**kept, 'keep': [1.0]})):
    with open(plan, 'w') as f:
      f.write(damaged)
    with pytest.raises(validation.ConfigError,
                       match=f'^{re.escape(plan)} is unreadable or does not fit the model'):
      table.run(config, workdir)


# ------------------------------------------------------------------------------------- MCR

def test_bezier_end_points_are_the_two_models(tiny_model):
  model, start, ds = tiny_model
  end = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  middle = model.init(jax.random.key(2), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  for t, expected in ((0.0, start), (1.0, end)):
    params = mcr.bezier(t, start['params'], middle, end['params'])
    jax.tree.map(np.testing.assert_array_equal, params, expected['params'])
  half = mcr.bezier(0.5, start['params'], middle, end['params'])
  jax.tree.map(lambda h, a, b, c: np.testing.assert_allclose(h, (a + 2 * b + c) / 4, atol=1e-6),
               half, start['params'], middle, end['params'])


def test_recomputed_batch_stats_are_the_data_statistics(tiny_model):
  model, variables, ds = tiny_model
  normalize = train_lib.normalizer(None, None)
  images = ds.train_images[:40]
  stats = mcr.recompute_batch_stats(model, variables['params'], variables['batch_stats'],
                                    images, normalize, batch_size=40)
  x = normalize(jnp.asarray(images, jnp.float32))
  # The first BN of block1 sees conv1's output: its exact mean and (biased) variance.
  conv = jax.lax.conv_general_dilated(
      x, variables['params']['conv1']['kernel'], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  bn = stats['block1']['bn1']
  np.testing.assert_allclose(bn['mean'], conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bn['var'], conv.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------- configs

def test_ablation_variants():
  for fraction in ('0.01', '0.05', '0.1', '0.2'):
    config = ablations.get_config(f'fraction_{fraction}')
    assert config.data.clean_fraction == float(fraction)
    count = stages.clean_count(config, data_lib.Dataset(
        np.zeros((config.data.train_size, 1, 1, 3)), None, None, None, 10))
    assert config.nad.batch_size <= count and config.teacher.batch_size <= count
  assert ablations.get_config('teacher_scratch').teacher.source == 'scratch'
  assert ablations.get_config('teacher_finetune').teacher.source == 'finetune'
  for group in (1, 2, 3):
    config = ablations.get_config(f'layers_group{group}')
    assert tuple(config.nad.layers) == (f'group{group}',) and len(config.nad.betas) == 1
  assert ablations.get_config('layers_all').nad.betas == (500.0, 1000.0, 1000.0)
  with pytest.raises(ValueError, match='fraction_0.3'):
    ablations.get_config('fraction_0.3')


def test_table_config_variants_and_errors(tmp_path):
  assert table1.get_config().table.attacks == ('badnets', 'blend')
  assert table1.get_config('all').table.attacks == defaults.ATTACK_VARIANTS
  sig = table1.get_config('sig').table.attack_configs.sig
  assert sig.attack.poison_rate == defaults.CLEAN_LABEL_RATE
  assert table1.get_config('cifar').data.source == 'tfds'
  with pytest.raises(ValueError, match='nope'):
    table1.get_config('nope')
  config = tiny_table_config()
  config.table.defenses = ('none', 'magic')
  with pytest.raises(stages.ConfigError, match='magic'):
    table.run(config, str(tmp_path))


def step_rates(lr_schedule: str, epochs: int, steps_per_epoch: int) -> list[float]:
  """The learning rate of every step of a stage at lr 0.5 with `lr_schedule`, read off the
  updates of plain SGD (no momentum, no decay) on a gradient of 1."""
  cfg = defaults.sgd_stage(epochs, 3, 0.5, lr_schedule=lr_schedule)
  cfg.update(dict(weight_decay=0.0, momentum=0.0))  # so each update is -lr * gradient
  tx = train_lib.make_optimizer(cfg, steps_per_epoch=steps_per_epoch)
  params = jnp.zeros(())
  state, rates = tx.init(params), []
  for _ in range(epochs * steps_per_epoch):
    updates, state = tx.update(jnp.ones(()), state, params)
    rates.append(-float(updates))
  return rates


def test_the_curve_learning_rate_is_held_then_falls_linearly_to_one_percent():
  """lr_schedule 'curve' (the authors' train.py): per epoch, lr while epoch / epochs <= 0.5,
  then linearly to 1% at 0.9, then 1%; each step of an epoch takes its epoch's rate."""
  rates = step_rates('curve', epochs=10, steps_per_epoch=3)
  factors = {1: 1.0, 5: 1.0, 6: 1.0 - 0.99 * 0.25, 7: 1.0 - 0.99 * 0.5, 8: 1.0 - 0.99 * 0.75,
             9: 0.01, 10: 0.01}
  for epoch, factor in factors.items():
    np.testing.assert_allclose(rates[3 * (epoch - 1):3 * epoch], [0.5 * factor] * 3, rtol=1e-4)


def test_the_cosine_learning_rate_is_annealed_once_an_epoch():
  """lr_schedule 'cosine' (BackdoorBench's CosineAnnealingLR, T_max = epochs, stepped per
  epoch): epoch e (0-based) trains at lr * (1 + cos(pi * e / epochs)) / 2."""
  rates = step_rates('cosine', epochs=4, steps_per_epoch=2)
  expected = [0.5 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4) for _ in range(2)]
  np.testing.assert_allclose(rates, expected, rtol=1e-5)


def test_an_epoch_repeats_the_clean_subset_to_its_samples():
  images = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  clean = (images, np.arange(4, dtype=np.int32), np.zeros(4, bool))
  tiled = mcr.repeated(clean, 10)
  np.testing.assert_array_equal(tiled[1], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
  np.testing.assert_array_equal(tiled[0][:, 0, 0, 0], tiled[1])
  assert tiled[2].shape == (10,) and not tiled[2].any()
  assert [len(a) for a in mcr.repeated(clean, 3)] == [4, 4, 4]  # never fewer than the subset
  stacked = mcr.repeated(tuple(np.stack([a, a]) for a in clean), 6)  # one subset per seed
  assert stacked[0].shape == (2, 6, 2, 2, 3)
  np.testing.assert_array_equal(stacked[1], [[0, 1, 2, 3, 0, 1]] * 2)


def test_curve_weight_decay_is_an_l2_term_on_the_sampled_point(tiny_model):
  """As the authors' curves.l2_regularizer: 0.5 * wd * ||theta(t)||^2 at the step's t, so
  the control point's gradient gains wd * 2t(1 - t) * theta(t)."""
  model, start, ds = tiny_model
  end = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  middle = jax.tree.map(lambda a, b: (a + b) / 2, start['params'], end['params'])
  ends = (start['params'], end['params'])
  x = jnp.asarray(ds.train_images[:8], jnp.float32) / 255
  y = jnp.asarray(ds.train_labels[:8])
  key, wd = jax.random.key(3), 0.01
  args = (start['batch_stats'], ends, x, y, key)
  gradient = lambda decay: jax.jit(jax.value_and_grad(mcr.curve_loss(model, decay),
                                                      has_aux=True))(middle, *args)
  (with_l2, aux), grads = gradient(wd)
  (plain, _), plain_grads = gradient(0.0)
  t = jax.random.uniform(key)
  point = mcr.bezier(t, ends[0], middle, ends[1])
  l2 = sum(float(jnp.sum(p ** 2)) for p in jax.tree.leaves(point))
  np.testing.assert_allclose(float(with_l2) - float(plain), 0.5 * wd * l2, rtol=1e-4)
  np.testing.assert_allclose(float(aux[1]), float(plain), rtol=1e-6)  # the CE it reports
  jax.tree.map(lambda g, h, p: np.testing.assert_allclose(
      g - h, wd * 2 * t * (1 - t) * p, rtol=1e-3, atol=1e-6), grads, plain_grads, point)


class Interrupted(Exception):
  pass


def test_fine_pruning_and_mcr_resume_where_they_were_stopped(table_run, tmp_path, monkeypatch):
  """FP and MCR train through the engine's stages: stopped right after a checkpoint (as a
  SIGKILL would leave them, tests/test_pipeline.py kills one for real), each resumes from
  it and ends with the numbers of an uninterrupted run."""
  config = tiny_table_config()
  config.student.checkpoint = os.path.join(table_run[0], 'badnets', 'backdoored')
  # FP follows NAD's schedule: two epochs each, a checkpoint after each, can stop halfway.
  config.nad.update(dict(epochs=2, eval_every=1))
  config.mcr.epochs = 2
  config.table.defenses = ('none', 'fp', 'mcr')
  config.table.figures = False
  uninterrupted = table.run(config, str(tmp_path / 'whole'))['details']['badnets']
  save = checkpoint.StageCheckpoints.save

  def stop_after(stage):
    def save_then_stop(self, epoch, state, history):
      save(self, epoch, state, history)
      if os.path.basename(self.directory) == stage and epoch == 1:
        raise Interrupted
    return save_then_stop

  workdir = str(tmp_path / 'stopped')
  for stage in ('fp', 'mcr'):
    monkeypatch.setattr(checkpoint.StageCheckpoints, 'save', stop_after(stage))
    with pytest.raises(Interrupted):
      table.run(config, workdir)
  monkeypatch.setattr(checkpoint.StageCheckpoints, 'save', save)
  resumed = table.run(config, workdir)['details']['badnets']
  for stage in ('fp', 'mcr'):
    assert resumed['history'][stage] == uninterrupted['history'][stage]
  assert len(resumed['stage_timing']['mcr']['img_per_s']) == 1  # only its epoch 2 trained
  assert resumed['mcr']['curve'] == uninterrupted['mcr']['curve']
