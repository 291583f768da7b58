"""The NAD pipeline: backdoored model -> teacher -> NAD student, with evaluation.

Each stage trains under its own orbax CheckpointManager in `workdir/<stage>`.
Rerunning the same command skips finished stages and resumes an interrupted
one from its last saved epoch. `config.eval_only` restores the checkpoints and
evaluates them without training (`evaluate_only`).
"""

import os
from typing import NamedTuple

from nad_jax import defaults
from nad_jax import stages
from nad_jax import validation
from nad_jax.defenses import nad as nad_lib

STAGES = ('backdoored', 'teacher', 'nad')


class Outcome(NamedTuple):
  """What `run` returns.

  Attributes:
    results: the content of `workdir/results.json`: 'stages' (final METRICS per
      stage; with `config.seeds` their means, and 'seeds', 'std', 'per_seed' as
      `stages.summarize` writes them), 'history', 'timing', 'config'.
    variables: {stage: {'params', 'batch_stats'}} of the three models, on the devices.
  """
  results: dict
  variables: dict


def check_overrides(config, fields) -> None:
  """Refuses `--config.attack.name=VARIANT`: an attack variant is chosen with the config
  file's variant (`configs/quickstart.py:sig`), which also sets its poison rate and the
  stage settings that go with it, so that a name means one thing everywhere. Refuses the
  fields the run does not read (validation.unread_fields: a loaded stage's recipe, an
  all-to-all target label).

  Args:
    config: the run's config, overrides applied.
    fields: the dotted fields the command line set (`--config.<field>=...`).

  Raises:
    ConfigError: naming the variant to use instead, or the field that is not read.
  """
  validation.refuse_overrides(config, fields, validation.unread_fields(config))
  name = config.attack.name
  if 'attack.name' in fields and name in defaults.ATTACK_VARIANTS:
    raise validation.ConfigError(
        f"attack.name {name!r}: choose an attack by the config file's variant "
        f"(--config=configs/<file>.py:{name}), which also sets its poison rate and stage "
        'settings; --config.attack.name takes attacks without a variant (files)')


def run(config, workdir: str) -> Outcome:
  """Runs (or resumes) every stage and writes `workdir/results.json`; an `eval.json` of
  `evaluate_only` is removed where a stage trained again.

  Args:
    config: the run's ConfigDict (configs/*.py).
    workdir: the stage folders and results.json go here.

  Returns:
    Outcome: the results written and the three models' variables.

  Raises:
    ConfigError: a bad config, data or checkpoint, or a workdir whose stages were
      trained with other values (validation.check_workdir); nothing is written then.
    FloatingPointError: a stage's loss became non-finite.
  """
  validation.check_workdir(config, workdir, STAGES)  # before the data is loaded
  ctx = stages.setup(config, workdir, folders=STAGES)
  results = {'backdoored': stages.backdoored(ctx)}
  student, student_metrics = results['backdoored'].variables, results['backdoored'].metrics
  results['teacher'] = nad_lib.teacher(ctx, student, student_metrics)
  results['nad'] = nad_lib.distill(ctx, student, results['teacher'].variables,
                                   stages.clean_data(ctx), student_metrics)

  path = os.path.join(workdir, 'results.json')
  earlier = stages.earlier_results(path)
  timing = stages.kept_timing(earlier.get('timing') or {},
                              {name: r.timing for name, r in results.items()})
  written = {
      **stages.summarize(config, {name: result.metrics for name, result in results.items()}),
      'history': {name: result.history for name, result in results.items()},
      'timing': stages.trained_with(timing, config.to_dict(), earlier.get('config')),
      **({'attack': ctx.attack.info} if ctx.attack.info else {}),
      'config': config.to_dict(),
  }
  stages.write_json(path, written)
  stages.remove_stale(os.path.join(workdir, 'eval.json'),
                      stages.trained_now(result.timing for result in results.values()))
  stages.log(stages.format_table(written['stages'], written.get('std')))
  return Outcome(written, {name: result.variables for name, result in results.items()})


def evaluate_only(config, workdir: str) -> dict:
  """Restores each stage's checkpoint (the workdir's, or the configured file), evaluates
  it and writes `workdir/eval.json`.

  Returns:
    The content of eval.json: `stages.summarize`'s figures, 'checkpoints' and 'config'
    (the evaluation's).

  Raises:
    ConfigError: a stage folder trained with other values than `config`'s
      (validation.check_workdir), a stage without a checkpoint or unfinished
      (stages.evaluation_sources), or a checkpoint that does not fit the model; nothing
      is written then.
  """
  validation.check_workdir(config, workdir, STAGES, evaluating=True)
  sources = stages.evaluation_sources(config, workdir, STAGES)
  ctx = stages.setup(config, workdir, folders=STAGES, evaluating=True)
  evaluated = {}
  for name, path in sources.items():
    variables = (ctx.checkpoints[name] if name in ctx.checkpoints else
                 stages.load_checkpoint(path, stages.stage_abstract(ctx),
                                        f'eval_only: stage {name!r}'))
    evaluated[name] = stages.pretrained(ctx, variables, path, name).metrics
  results = {**stages.summarize(config, evaluated), 'checkpoints': sources,
             'config': config.to_dict()}
  stages.write_json(os.path.join(workdir, 'eval.json'), results)
  stages.log(stages.format_table(results['stages'], results.get('std')))
  return results
