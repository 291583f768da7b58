"""A workdir belongs to the config that made it; a finished stage costs nothing on a rerun."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from configs import tiny
from nad_jax import attacks, checkpoint, stages, validation
from nad_jax.experiments import nad as nad_runner

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them


def tiny_config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    *parents, field = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[field] = value
  return config


def snapshot(directory) -> dict:
  """Every file under `directory` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      stat = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('workdir'))
  return workdir, nad_runner.run(tiny_config(), workdir).results


@pytest.mark.parametrize('override,stage,change', [
    ({'attack.target_label': 3}, 'backdoored', 'attack.target_label 5 -> 3'),
    ({'model.name': 'wrn16_1'}, 'backdoored', "model.name 'tiny' -> 'wrn16_1'"),
    ({'seed': 1}, 'backdoored', 'seed 0 -> 1'),
    ({'teacher.learning_rate': 0.01}, 'teacher', 'teacher.learning_rate 0.05 -> 0.01'),
    ({'nad.betas': (1.0, 2.0, 3.0)}, 'nad', 'nad.betas [500.0, 1000.0, 1000.0] -> [1.0, 2.0, 3.0]'),
])
def test_a_changed_field_stops_the_rerun_before_anything_is_written(finished_run, override,
                                                                     stage, change):
  workdir, _ = finished_run
  before = snapshot(workdir)
  with pytest.raises(validation.ConfigError) as error:
    nad_runner.run(tiny_config(**override), workdir).results
  message = str(error.value)
  assert f"stage {stage!r} in {os.path.join(workdir, stage)}" in message
  assert change in message and 'another --workdir' in message
  assert '\n' not in message
  assert snapshot(workdir) == before


def test_fields_that_shape_no_stage_do_not_block_a_rerun(finished_run):
  workdir, results = finished_run
  again = nad_runner.run(tiny_config(**{'nad.eval_every': 2, 'data.eval_batch_size': 64,
                                      'compilation_cache': ''}), workdir).results
  assert again['stages'] == results['stages']
  assert all(t['from_earlier_run'] for t in again['timing'].values())  # nothing trained
  for stage, timing in again['timing'].items():  # the first run's, with where it ran
    first = results['timing'][stage]
    assert first['wall_s'] > 0 and first['machine'] == stages.machine()
    assert {k: timing[k] for k in ('img_per_s', 'wall_s', 'machine')} == {
        k: first[k] for k in ('img_per_s', 'wall_s', 'machine')}


def test_new_betas_rerun_nad_on_the_same_backdoored_model_and_teacher(finished_run, tmp_path):
  workdir, results = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, 'nad'))  # what the error message says to do
  rerun = nad_runner.run(tiny_config(**{'nad.betas': (0.0, 0.0, 5000.0),
                                        'data.eval_batch_size': 64,
                                        'teacher.eval_every': 2}), copy).results
  assert rerun['history']['backdoored'] == results['history']['backdoored']
  assert rerun['history']['teacher'] == results['history']['teacher']
  assert rerun['timing']['backdoored']['from_earlier_run']
  assert rerun['timing']['teacher']['from_earlier_run']
  # the kept stages were evaluated with the first run's values, which the config no longer has
  assert rerun['config']['data']['eval_batch_size'] == 64
  assert rerun['timing']['backdoored']['trained_with'] == {
      'data.eval_batch_size': results['config']['data']['eval_batch_size']}
  assert rerun['timing']['teacher']['trained_with'] == {
      'data.eval_batch_size': results['config']['data']['eval_batch_size'],
      'teacher.eval_every': results['config']['teacher']['eval_every']}
  assert 'trained_with' not in rerun['timing']['nad']
  assert 'from_earlier_run' not in rerun['timing']['nad']
  assert len(rerun['timing']['nad']['img_per_s']) == 2  # NAD alone trained again
  assert rerun['history']['nad'] != results['history']['nad']


def test_checkpoints_without_a_record_are_refused(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, 'teacher', validation.FINGERPRINT))
  with pytest.raises(validation.ConfigError, match="stage 'teacher'.*without a record"):
    nad_runner.run(tiny_config(), copy).results


def test_a_corrupt_checkpoint_is_one_message_naming_the_folder(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  for root, _, files in os.walk(os.path.join(copy, 'teacher', '2')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\0' * 7)
  shutil.rmtree(os.path.join(copy, 'nad'))
  with pytest.raises(validation.ConfigError) as error:
    nad_runner.run(tiny_config(), copy).results
  assert os.path.join(copy, 'teacher') in str(error.value)
  assert '\n' not in str(error.value)


def test_all_betas_zero_records_no_attention_term(tmp_path):
  results = nad_runner.run(tiny_config(**{'nad.betas': (0.0, 0.0, 0.0), 'backdoor_training.epochs': 1,
                                        'teacher.epochs': 1, 'nad.epochs': 1}), str(tmp_path)).results
  assert all('at' not in entry for entry in results['history']['nad'])


class Interrupted(Exception):
  pass


def test_a_clean_label_stage_prepares_once_across_kill_resume_and_rerun(tmp_path, monkeypatch,
                                                                       capsys):
  """CL trains a surrogate and runs PGD in `prepare`, saying so; a resumed or finished stage
  reuses it."""
  config = tiny_config(**{'attack.name': 'cl', 'attack.poison_rate': 0.8,
                          'attack.surrogate.epochs': 1, 'teacher.epochs': 0, 'nad.epochs': 0})
  workdir = str(tmp_path)
  calls = []
  prepare = attacks.prepare
  monkeypatch.setattr(stages.attacks_lib, 'prepare',
                      lambda *args: calls.append(1) or prepare(*args))
  save = checkpoint.StageCheckpoints.save

  def save_then_stop(self, epoch, state, history):
    save(self, epoch, state, history)
    raise Interrupted  # as if killed right after the first epoch's checkpoint

  monkeypatch.setattr(checkpoint.StageCheckpoints, 'save', save_then_stop)
  with pytest.raises(Interrupted):
    nad_runner.run(config, workdir).results
  assert calls == [1]
  printed = capsys.readouterr().out
  assert '[backdoored] preparing the cl training set of seed 0' in printed
  assert '[backdoored] prepared in' in printed
  assert '[backdoored] evaluating on the ' in printed and '[backdoored] evaluated in' in printed
  prepared = os.path.join(workdir, 'backdoored', stages.PREPARED)
  assert os.path.isfile(prepared)
  monkeypatch.setattr(checkpoint.StageCheckpoints, 'save', save)
  resumed = nad_runner.run(config, workdir).results
  assert calls == [1]  # the resumed stage read the prepared set
  assert len(resumed['timing']['backdoored']['img_per_s']) == 1
  assert not os.path.exists(prepared)  # dropped once the stage finished
  rerun = nad_runner.run(config, workdir).results
  assert calls == [1] and rerun['stages'] == resumed['stages']


def test_other_data_under_the_same_config_is_refused(finished_run, tmp_path):
  """An image folder whose files changed keeps its config; the data's digest tells."""
  workdir, _ = finished_run
  with open(os.path.join(workdir, 'backdoored', validation.FINGERPRINT)) as f:
    digest = json.load(f)['fields']['data.digest']
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  validation.check_workdir(tiny_config(), copy, nad_runner.STAGES, digest)
  with pytest.raises(validation.ConfigError, match='the data .its images or labels changed'):
    validation.check_workdir(tiny_config(), copy, nad_runner.STAGES, '0123456789abcdef')
  # Before the data is loaded, the config alone is compared.
  validation.check_workdir(tiny_config(), copy, nad_runner.STAGES)


def test_stages_restored_without_a_results_file_say_what_they_ran_with(finished_run, tmp_path):
  """A run killed after its stages but before results.json: the rerun restores every stage,
  marks it with the speeds it trained at, and names the values it ran with that the rerun's
  config does not have."""
  workdir, results = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, 'results.json'))
  rerun = nad_runner.run(tiny_config(**{'data.eval_batch_size': 64}), copy).results
  assert rerun['stages'] == results['stages']
  assert rerun['config']['data']['eval_batch_size'] == 64
  first = results['config']['data']['eval_batch_size']
  assert rerun['timing'] == {name: {**results['timing'][name], 'from_earlier_run': True,
                                    'trained_with': {'data.eval_batch_size': first}}
                             for name in nad_runner.STAGES}  # the speeds: from each folder


def test_a_retrained_stage_reports_its_own_speeds(finished_run, tmp_path):
  """A stage trained again, by a run killed before it wrote results.json, keeps the speeds
  it was trained at (its folder's), not those the older results.json lists for it."""
  workdir, results = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  for stage in ('teacher', 'nad'):
    shutil.rmtree(os.path.join(copy, stage))
  retrained = nad_runner.run(tiny_config(), copy).results['timing']['teacher']
  shutil.copyfile(os.path.join(workdir, 'results.json'), os.path.join(copy, 'results.json'))
  again = nad_runner.run(tiny_config(), copy).results['timing']['teacher']
  assert again == {**retrained, 'from_earlier_run': True}
  assert again['img_per_s'] != results['timing']['teacher']['img_per_s']


def test_an_unfinished_stage_resumes_with_the_values_it_started_with(finished_run, tmp_path):
  """A stage runs with one set of evaluation values, which its folder records: resuming an
  interrupted one with others is refused before anything is written."""
  workdir, _ = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, 'teacher', '2'))  # as if killed after epoch 1 of 2
  before = snapshot(copy)
  with pytest.raises(validation.ConfigError, match=r"^stage 'teacher' in .* stopped at epoch 1 "
                     r"of 2 and ran with other values: model.conv 'auto' -> 'xla'\. Resume"):
    nad_runner.run(tiny_config(**{'model.conv': 'xla'}), copy)
  assert snapshot(copy) == before


def test_a_stage_stopped_before_its_first_checkpoint_records_the_run_that_trains_it(
    finished_run, tmp_path):
  """Nothing of a stage killed before its first checkpoint is kept, so the next run trains
  it with its own values, and its folder records those."""
  workdir, _ = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  for stopped in ('1', '2'):  # the teacher, as if killed while compiling
    shutil.rmtree(os.path.join(copy, 'teacher', stopped))
  shutil.rmtree(os.path.join(copy, 'nad'))  # it starts from the teacher
  rerun = nad_runner.run(tiny_config(**{'model.conv': 'xla'}), copy).results
  assert validation.recorded_values(os.path.join(copy, 'teacher'))['model.conv'] == 'xla'
  for stage in ('teacher', 'nad'):
    assert 'trained_with' not in rerun['timing'][stage]
    assert len(rerun['timing'][stage]['img_per_s']) == 2  # trained again, both epochs


def test_a_stage_stopped_before_its_first_checkpoint_keeps_its_fields(finished_run, tmp_path):
  """What a stage prepared before its first checkpoint (a clean-label attack's training
  set) stays in its folder, so the folder's record still refuses other fields."""
  workdir, _ = finished_run
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  for stage in ('teacher', 'nad'):
    shutil.rmtree(os.path.join(copy, stage))
  for epoch in checkpoint.finished_epochs(os.path.join(copy, 'backdoored')):
    shutil.rmtree(os.path.join(copy, 'backdoored', str(epoch)))
  with pytest.raises(validation.ConfigError,
                     match='was started with other values: attack.target_label 5 -> 3'):
    nad_runner.run(tiny_config(**{'attack.target_label': 3}), copy)


def test_a_stage_of_no_epochs_is_kept_as_the_others(tmp_path):
  """A teacher of 0 epochs (the backdoored model, evaluated) is restored on a rerun like
  the trained stages: marked, with the values it ran with."""
  workdir = str(tmp_path / 'run')
  first = nad_runner.run(tiny_config(**{'teacher.epochs': 0}), workdir).results
  again = nad_runner.run(tiny_config(**{'teacher.epochs': 0, 'model.conv': 'xla'}),
                         workdir).results
  assert again['stages'] == first['stages']
  assert all(t['from_earlier_run'] and t['trained_with'] == {'model.conv': 'auto'}
             for t in again['timing'].values())


def test_a_refool_selection_is_reported_and_kept_by_a_rerun(tmp_path):
  """What Refool's selection measured reaches results.json, and a rerun, which keeps the
  selection, reports the same rounds."""
  overrides = {'attack.name': 'refool', 'attack.poison_rate': 0.8, 'attack.reflections': 4,
               'attack.reflection_candidates': 8, 'attack.selection_rounds': 2,
               'attack.selection_holdout': 40, 'attack.surrogate.epochs': 1,
               'attack.surrogate.batch_size': 64}
  workdir = str(tmp_path / 'run')
  first = nad_runner.run(tiny_config(**overrides), workdir).results
  assert [r['round'] for r in first['attack']['selection_rounds']] == [1, 2]
  again = nad_runner.run(tiny_config(**overrides), workdir).results
  assert again['attack'] == first['attack']
  # A refused rerun is refused before the attack's build selects (and writes) anew.
  before = snapshot(workdir)
  with pytest.raises(validation.ConfigError, match='attack.reflections 4 -> 5'):
    nad_runner.run(tiny_config(**{**overrides, 'attack.reflections': 5}), workdir)
  assert snapshot(workdir) == before
  # A kept selection that is not one (an older format, a damaged file) is one message.
  copy = str(tmp_path / 'damaged')
  shutil.copytree(workdir, copy)
  kept = os.path.join(copy, 'refool_selected.json')
  with open(kept) as f:
    damaged = json.load(f)
  damaged['value'] = damaged['value']['chosen']
  with open(kept, 'w') as f:
    json.dump(damaged, f)
  with pytest.raises(validation.ConfigError, match='refool_selected.json is not a selection'):
    nad_runner.run(tiny_config(**overrides), copy)
  # A run refused after the build (here: a layer the model does not sow) keeps no choice.
  fresh = str(tmp_path / 'refused')
  with pytest.raises(validation.ConfigError, match=r"nad.layers \['nosuch'\]"):
    nad_runner.run(tiny_config(**{**overrides, 'nad.layers': ('nosuch',), 'nad.betas': (1.0,)}),
                   fresh)
  assert not os.path.exists(fresh)
  # Each evaluation batch draws its reflections from its own key, so the batch size shapes
  # Refool's figures: neither a rerun nor an evaluation-only run may change it.
  other_batch = tiny_config(**{**overrides, 'data.eval_batch_size': 64})
  with pytest.raises(validation.ConfigError, match='data.eval_batch_size 128 -> 64'):
    nad_runner.run(other_batch, workdir)
  with pytest.raises(validation.ConfigError, match='data.eval_batch_size 128 -> 64'):
    nad_runner.evaluate_only(other_batch, workdir)
  assert snapshot(workdir) == before


def test_a_model_replaced_at_its_checkpoint_path_is_another_model(finished_run, tmp_path):
  """Stages trained from `student.checkpoint` record the weights it held, not only its path:
  a rerun or an evaluation over another model at the same path is refused, before anything
  is written, as one over other data is."""
  workdir, _ = finished_run
  model, run = str(tmp_path / 'model'), str(tmp_path / 'run')

  def put(stage):  # a finished stage folder of the first run, at the same path
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, stage), model)
  put('backdoored')
  config = tiny_config(**{'student.checkpoint': model})
  first = nad_runner.run(config, run).results
  put('teacher')  # another model of the same architecture
  before = snapshot(run)
  for evaluating in (False, True):
    with pytest.raises(validation.ConfigError) as error:
      (nad_runner.evaluate_only if evaluating else nad_runner.run)(config, run)
    assert (f"stage 'teacher' in {os.path.join(run, 'teacher')} was trained with other values: "
            'the model at student.checkpoint (its weights changed; digest)') in str(error.value)
  assert snapshot(run) == before
  put('backdoored')  # the model it was trained from: the run is kept
  assert nad_runner.run(config, run).results['stages'] == first['stages']


def test_a_trigger_file_replaced_at_its_path_is_another_run(tmp_path):
  """The attack's files count by their bytes, as the data and the loaded models do."""
  from PIL import Image
  pattern, run = str(tmp_path / 'trigger.png'), str(tmp_path / 'run')

  def draw(seed):
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(pattern)
  draw(0)
  config = tiny_config(**{'attack.name': 'blend', 'attack.pattern_path': pattern})
  first = nad_runner.run(config, run).results
  draw(1)
  before = snapshot(run)
  with pytest.raises(validation.ConfigError, match=re.escape(
      f"stage 'backdoored' in {os.path.join(run, 'backdoored')} was trained with other "
      'values: the files at attack.pattern_path (their content changed; digest)')):
    nad_runner.evaluate_only(config, run)
  assert snapshot(run) == before
  draw(0)
  assert nad_runner.evaluate_only(config, run)['stages'] == first['stages']
