"""nad-jax speed benchmark, with a PyTorch eager reference run by the same command.

Parts (images/second after warm-up; compile time reported separately):
  train  one epoch of `--steps` steps of the backdoored model's training (TrainEpoch:
         gather, BadNets poisoning of 10%, CE, SGD), no augmentation, as the official code;
  nad    a NAD step: student forward+backward plus teacher forward, AT loss on 3 layers,
         crop+flip+Cutout on the device (TrainEpoch with betas);
  eval   make_evaluate: a clean and a triggered forward per test image; img/s counts forwards;
  stage  the whole NAD stage as the official code runs it: 20 epochs on 2,500 images at
         batch 64 with augmentation, plus an evaluation of the clean (10,000) and the
         triggered test set after every epoch and once before. Wall time. With
         --replicas K > 1, K models (config.seeds) train and evaluate side by side in
         one program, each on its own copy of the 2,500 images.

Each device count in --devices runs in its own subprocess (XLA_FLAGS
--xla_force_host_platform_device_count=N on CPU); the PyTorch reference (if torch
imports) runs in another. Results: <out>.json and <out>.md.

  python benchmarks/bench.py                      # everything, both models, 3 batches
  python benchmarks/bench.py --models wrn16_1 --batches 128 --parts nad --devices 1,2,4
  python benchmarks/bench.py --parts stage --epochs 2 --replicas 1,2,4,8 --torch off
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PARTS = ('train', 'nad', 'eval', 'stage')


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--models', default='wrn16_1,preact_resnet18')
  p.add_argument('--batches', default='64,128,512')
  p.add_argument('--parts', default='train,nad,eval,stage')
  p.add_argument('--devices', default='1',
                 help="device counts, e.g. 1,2,4 (one subprocess each); '': PyTorch alone")
  p.add_argument('--steps', type=int, default=10, help='timed steps per part for wrn16_1')
  p.add_argument('--preact-steps', type=int, default=2, help='timed steps for preact_resnet18')
  p.add_argument('--repeats', type=int, default=2, help='timed repeats; the best is reported')
  p.add_argument('--epochs', type=int, default=20, help='stage: NAD epochs (official: 20)')
  p.add_argument('--stage-models', default='wrn16_1', help='models for the stage part')
  p.add_argument('--replicas', default='1',
                 help='stage: replica counts K, e.g. 1,2,4,8 (K seeds side by side)')
  p.add_argument('--eval-batch', type=int, default=1000, help='nad-jax stage eval batch')
  p.add_argument('--torch-eval-batch', type=int, default=64,
                 help='PyTorch stage eval batch (the official code: 64)')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--conv', default='auto', choices=('auto', 'xla', 'onednn'),  # models.CONVS
                 help="nad-jax's convolutions (model.conv): 'auto' (the default: oneDNN on one "
                      "CPU device, else XLA), XLA's or oneDNN's")
  p.add_argument('--scan', default='auto', choices=('auto', 'on', 'off'),
                 help='one dispatch per epoch (lax.scan); auto: on GPU/TPU, off on CPU')
  p.add_argument('--xla-flags', default='',
                 help='extra XLA_FLAGS (nad-jax already sets its CPU options per compile)')
  p.add_argument('--compile-cache', default='',
                 help='persistent compilation cache dir (reruns skip compiling)')
  p.add_argument('--torch', default='auto', choices=('auto', 'on', 'off'))
  p.add_argument('--torch-threads', type=int, default=os.cpu_count())
  p.add_argument('--torch-device', default='cpu', choices=('cpu', 'cuda'))
  p.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'latest'))
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # 'jax:N' or 'torch'
  p.add_argument('--result', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  check(p, args)
  return args


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: must be an integer >= 1')
  return value


def positive_ints(text: str) -> list[int]:
  """argparse type: comma-separated integers >= 1."""
  return [positive_int(v) for v in text.split(',')]


def check(parser: argparse.ArgumentParser, args) -> None:
  """Ends the command in one line (argparse's usage error, status 2) at a value that
  would fail in a worker or measure nothing."""
  from nad_jax import models  # pylint: disable=g-import-not-at-top  (imports JAX)
  for flag in ('batches', 'devices', 'replicas'):
    text = getattr(args, flag)
    if text or flag != 'devices':  # devices '': no nad-jax worker
      try:
        positive_ints(text)
      except argparse.ArgumentTypeError:
        parser.error(f'--{flag} {text!r}: comma-separated integers >= 1')
  for flag, choices in (('models', models.MODELS), ('stage_models', models.MODELS),
                        ('parts', PARTS)):
    text = getattr(args, flag)
    if not csv(text) or any(v not in choices for v in csv(text)):
      parser.error(f"--{flag.replace('_', '-')} {text!r}: comma-separated names of "
                   f"{', '.join(choices)}")
  for flag in ('steps', 'preact_steps', 'repeats', 'epochs', 'eval_batch', 'torch_eval_batch',
               'torch_threads'):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
  folder = os.path.dirname(os.path.abspath(args.out))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    parser.error(f'--out {args.out}: {folder} is not a folder this user can write to')


def csv(s, cast=str):
  return [cast(v) for v in s.split(',') if v]


def steps_for(args, model):
  return args.preact_steps if model == 'preact_resnet18' else args.steps


def load():
  with open('/proc/loadavg') as f:
    return float(f.read().split()[0])


# ------------------------------------------------------------------------ nad-jax worker

def jax_worker(args, num_devices):
  import jax
  import jax.numpy as jnp
  import numpy as np
  if args.compile_cache:
    jax.config.update('jax_compilation_cache_dir', args.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  import ml_collections
  from nad_jax import attacks, data, defaults, models
  from nad_jax import train as T

  mesh = T.make_mesh(num_devices)
  scan = {'auto': None, 'on': True, 'off': False}[args.scan]
  normalize = T.normalizer(None, None)
  attack_cfg = ml_collections.ConfigDict(dict(
      name='badnets', target_label=5, poison_rate=0.1, mode='all_to_one', pattern='grid',
      size=3, corner='bottom_right', seed=0))
  rows = []

  def stage_cfg(batch, epochs=1, lr_boundaries=()):
    return defaults.sgd_stage(epochs, batch, 0.1, lr_boundaries)

  ran = models.build_model('tiny', 10, args.dtype, args.conv)  # what 'auto' resolves to here

  def row(**kw):
    kw.update(framework='nad-jax', devices=num_devices, backend=jax.default_backend(),
              dtype=jnp.dtype(ran.dtype).name, conv='xla' if ran.conv is None else 'onednn',
              load=load())
    if 'img_per_s' in kw:
      kw['img_per_s_per_device'] = round(kw['img_per_s'] / num_devices, 1)
    print(json.dumps(kw), flush=True)
    rows.append(kw)

  for name in csv(args.models):
    model = models.build_model(name, 10, args.dtype, args.conv)
    attack = attacks.build_attack(attack_cfg, 10, (32, 32, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           train=False))()
    for batch in csv(args.batches, int):
      if batch % num_devices:
        continue
      steps = steps_for(args, name)
      n = steps * batch
      ds = data.synthetic(0, n, 0)
      for part in csv(args.parts):
        if part not in ('train', 'nad'):
          continue
        nad = part == 'nad'
        recipe = T.Recipe(batch, crop_flip=nad, cutout=3 if nad else 0,
                          betas=(500.0, 1000.0, 1000.0) if nad else (),
                          layers=tuple(model.distill_layers) if nad else ())
        tx = T.make_optimizer(stage_cfg(batch), steps)
        state = T.replicate(T.state_from_variables(variables, tx), mesh)
        teacher = T.replicate(variables, mesh) if nad else {}
        poisoned = (np.zeros(n, bool) if nad else
                    attacks.poison_mask(ds.train_labels, attack, 0.1, np.random.default_rng(0)))
        on_device = T.replicate((ds.train_images, ds.train_labels, poisoned), mesh)
        run = T.TrainEpoch(model, tx, mesh, recipe, normalize, None if nad else attack, scan)
        start = time.perf_counter()
        run.compile(state, teacher, *on_device)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        state, m = run(state, teacher, *on_device, jax.random.key(1))  # warm-up epoch
        jax.block_until_ready(m)
        warm_s = time.perf_counter() - start
        best = float('inf')
        for r in range(args.repeats):
          start = time.perf_counter()
          state, m = run(state, teacher, *on_device, jax.random.key(2 + r))
          jax.block_until_ready(m)
          best = min(best, time.perf_counter() - start)
        row(model=name, part=part, batch=batch, steps=steps, img_per_s=round(n / best, 1),
            step_ms=round(1e3 * best / steps, 2), compile_s=round(compile_s, 2),
            warmup_epoch_s=round(warm_s, 2), scan=run.scan)
        del state, on_device
      if 'eval' in csv(args.parts):
        test = T.make_test_set(ds.train_images, ds.train_labels, batch, mesh, attack)
        evaluate = T.make_evaluate(model, mesh, normalize, attack, scan)
        v = T.replicate(variables, mesh)
        start = time.perf_counter()
        jax.block_until_ready(evaluate(v, test, jax.random.key(0)))
        warm_s = time.perf_counter() - start
        best = float('inf')
        for _ in range(args.repeats):
          start = time.perf_counter()
          jax.block_until_ready(evaluate(v, test, jax.random.key(0)))
          best = min(best, time.perf_counter() - start)
        forwards = n + int(np.sum(test.backdoor_valid))  # clean pass + triggered non-target pass
        row(model=name, part='eval', batch=batch, steps=steps, img_per_s=round(forwards / best, 1),
            step_ms=round(1e3 * best / steps, 2), warmup_s=round(warm_s, 2))

  if 'stage' in csv(args.parts):
    ds = data.synthetic(0, 2500, 10_000)
    for name, count in ((n, k) for n in csv(args.stage_models) for k in csv(args.replicas, int)):
      model = models.build_model(name, 10, args.dtype, args.conv)
      attack = attacks.build_attack(attack_cfg, 10, (32, 32, 3))
      stacked = count > 1
      # K replicas: K initialisations, each with its own copy of the training set, as
      # config.seeds trains them (stages.per_seed); one replica: the single-seed program.
      per_replica = lambda f: jax.vmap(f)(jax.random.split(jax.random.key(0), count)) \
          if stacked else f(jax.random.key(0))
      copies = lambda x: np.broadcast_to(x, (count, *x.shape)) if stacked else x
      variables = jax.jit(lambda: per_replica(lambda k: model.init(
          k, jnp.zeros((1, 32, 32, 3)), train=False)))()
      batch = 64 - 64 % num_devices
      steps = 2500 // batch
      recipe = T.Recipe(batch, crop_flip=True, cutout=3, betas=(500.0, 1000.0, 1000.0),
                        layers=tuple(model.distill_layers))
      tx = T.make_optimizer(stage_cfg(batch, args.epochs, (2,)), steps)
      start_state = lambda v: T.state_from_variables(v, tx)
      state = T.replicate((jax.vmap(start_state) if stacked else start_state)(variables), mesh)
      teacher = T.replicate(variables, mesh)
      on_device = T.replicate(tuple(copies(x) for x in (
          ds.train_images, ds.train_labels, np.zeros(2500, bool))), mesh)
      eval_batch = args.eval_batch - args.eval_batch % num_devices
      test = T.make_test_set(ds.test_images, ds.test_labels, eval_batch, mesh, attack)
      run = T.TrainEpoch(model, tx, mesh, recipe, normalize, None, scan, replicas=stacked)
      evaluate = T.make_evaluate(model, mesh, normalize, attack, scan, replicas=stacked)
      keys = lambda key: jax.random.split(key, count) if stacked else key
      fold_in = jax.vmap(jax.random.fold_in, (0, None)) if stacked else jax.random.fold_in
      start = time.perf_counter()
      run.compile(state, teacher, *on_device)
      compile_s = time.perf_counter() - start
      start = time.perf_counter()  # eval warm-up: compile + one whole evaluation
      jax.device_get(evaluate(state.variables, test, keys(jax.random.key(7))))
      eval_warmup_s = time.perf_counter() - start
      t_train = t_eval = 0.0
      start = time.perf_counter()
      metrics = jax.device_get(evaluate(state.variables, test, keys(jax.random.key(7))))
      t_eval += time.perf_counter() - start
      for epoch in range(args.epochs):
        s = time.perf_counter()
        state, losses = run(state, teacher, *on_device, fold_in(keys(jax.random.key(3)), epoch))
        jax.device_get(losses)
        t_train += time.perf_counter() - s
        s = time.perf_counter()
        metrics = jax.device_get(evaluate(state.variables, test, keys(jax.random.key(7))))
        t_eval += time.perf_counter() - s
      row(model=name, part='stage', replicas=count, batch=batch, epochs=args.epochs,
          eval_batch=eval_batch, wall_s=round(t_train + t_eval, 2), train_s=round(t_train, 2),
          eval_s=round(t_eval, 2), compile_s=round(compile_s, 2),
          eval_warmup_s=round(eval_warmup_s, 2),
          img_per_s=round(count * args.epochs * steps * batch / t_train, 1),
          acc=round(float(np.mean(metrics['acc'])), 2),
          asr=round(float(np.mean(metrics['asr'])), 2))
  return rows


# ------------------------------------------------------------------------ PyTorch worker

def torch_worker(args):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference as R  # pylint: disable=g-import-not-at-top
  if args.torch_device == 'cuda' and not torch.cuda.is_available():
    sys.exit('--torch-device cuda: PyTorch sees no CUDA device on this machine')
  R.setup(args.torch_threads, args.torch_device)
  rows = []

  def row(**kw):
    kw.update(framework='pytorch', devices=1, backend=args.torch_device, dtype='float32',
              load=load(), threads=args.torch_threads)
    print(json.dumps(kw), flush=True)
    rows.append(kw)

  for name in csv(args.models):
    for batch in csv(args.batches, int):
      steps = steps_for(args, name)
      for part in csv(args.parts):
        if part == 'stage':
          continue
        best = float('inf')
        for _ in range(args.repeats):
          sec, warm = R.time_steps(part, name, batch, steps)
          best = min(best, sec)
        img = batch / best  # eval: one forward per step
        row(model=name, part=part, batch=batch, steps=steps, img_per_s=round(img, 1),
            step_ms=round(1e3 * best, 2), warmup_s=round(warm, 2))
  if 'stage' in csv(args.parts):
    from nad_jax import data
    ds = data.synthetic(0, 2500, 10_000)
    for name in csv(args.stage_models):
      r = R.nad_stage(name, ds.train_images, ds.train_labels, ds.test_images, ds.test_labels,
                      epochs=args.epochs, eval_batch=args.torch_eval_batch, log=lambda *_: None)
      row(model=name, part='stage', batch=64, epochs=args.epochs, eval_batch=args.torch_eval_batch,
          wall_s=round(r['wall_s'], 2), train_s=round(r['train_s'], 2),
          eval_s=round(r['eval_s'], 2), img_per_s=round(args.epochs * (2500 // 64) * 64
                                                         / r['train_s'], 1),
          acc=round(r['acc'], 2), asr=round(r['asr'], 2))
  return rows


# ---------------------------------------------------------------------------- driver

def versions():
  out = {'python': platform.python_version()}
  for mod in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch'):
    try:
      out[mod] = __import__(mod).__version__
    except ImportError:
      pass
  return out


def machine():
  """This machine as a result file records it: `stages.machine()`'s CPU model, features and
  cores, with the host name and platform."""
  from nad_jax import stages  # pylint: disable=g-import-not-at-top
  here = stages.machine()
  return {'host': platform.node(), 'cpu': here['cpu'], 'cpu_features': here['cpu_features'],
          'cores': here['cores'], 'platform': platform.platform()}


def spawn(args, worker, env_flags):
  """Runs one worker ('jax:N' or 'torch') in a subprocess; returns (rows, its XLA_FLAGS).

  Exits with status 1 and one line naming the worker (and, for PyTorch, the device)
  where it fails: a table with a missing column is not a result.
  """
  with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
    result = f.name
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(x for x in (env.get('XLA_FLAGS', ''), env_flags) if x).strip()
  cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--worker', worker,
         '--result', result]
  print(f'--- {worker}  XLA_FLAGS={env["XLA_FLAGS"]!r}  load {load():.2f}', flush=True)
  proc = subprocess.run(cmd, env=env)
  rows = []
  if os.path.getsize(result):
    with open(result) as f:
      rows = json.load(f)
  os.unlink(result)
  if proc.returncode:
    what = (f'the PyTorch reference (--torch-device {args.torch_device})' if worker == 'torch'
            else f'the nad-jax run on {worker.split(":")[1]} device(s)')
    sys.exit(f'error: {what} failed (exit status {proc.returncode}); its output is above')
  return rows, env['XLA_FLAGS']


def table(rows):
  """Markdown: one line per (model, part, batch); nad-jax per device count, PyTorch, ratio."""
  jax_devices = sorted({r['devices'] for r in rows if r['framework'] == 'nad-jax'})
  keys = []
  for r in rows:
    k = (r['model'], r['part'], r['batch'])
    if k not in keys:
      keys.append(k)
  head = ['model', 'part', 'batch']
  for d in jax_devices:
    head.append(f'nad-jax {d} dev img/s' + (' (per dev)' if d > 1 else ''))
  head += ['PyTorch img/s', 'nad-jax/PyTorch (1 dev)', 'compile s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  stage_lines = []
  for model, part, batch in keys:
    get = lambda fw, d=1: next((r for r in rows if r['framework'] == fw and r['model'] == model
                                and r['part'] == part and r['batch'] == batch
                                and r['devices'] == d and r.get('replicas', 1) == 1), None)
    cells = [model, part, str(batch)]
    for d in jax_devices:
      r = get('nad-jax', d)
      cells.append('' if r is None else (f"{r['img_per_s']:.0f}" + (
          f" ({r['img_per_s_per_device']:.0f})" if d > 1 else '')))
    t, j = get('pytorch'), get('nad-jax', 1)
    cells.append('' if t is None else f"{t['img_per_s']:.0f}")
    cells.append('' if t is None or j is None else f"{j['img_per_s'] / t['img_per_s']:.2f}x")
    cells.append('' if j is None or 'compile_s' not in j else f"{j['compile_s']:.1f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
    if part == 'stage':
      for fw, d in [('nad-jax', d) for d in jax_devices] + [('pytorch', 1)]:
        r = get(fw, d)
        if r:
          stage_lines.append(
              f"| {model} | {fw} | {d} | {r['wall_s']:.1f} | {r['train_s']:.1f} | "
              f"{r['eval_s']:.1f} | {r['eval_batch']} | {r.get('compile_s', 0):.1f} | "
              f"{r['acc']:.2f} | {r['asr']:.2f} |")
  if stage_lines:
    epochs = next(r['epochs'] for r in rows if r['part'] == 'stage')
    lines += ['', f'Whole NAD stage ({epochs} epochs on 2,500 images at batch 64 with '
              'augmentation; clean + triggered test set evaluated before and after every '
              'epoch; wall s = train s + eval s, compile excluded):', '',
              '| model | framework | devices | wall s | train s | eval s | eval batch | '
              'compile s | final acc | final asr |', '|---|---|---|---|---|---|---|---|---|---|',
              *stage_lines]
  stacked = [r for r in rows if r['part'] == 'stage' and r['framework'] == 'nad-jax']
  if any(r.get('replicas', 1) > 1 for r in stacked):
    lines += ['', 'K replicas side by side (config.seeds), the same stage for every replica:',
              '', '| model | devices | K | wall s | train s | eval s | wall / wall at K=1 | '
              'wall per replica s |', '|---|---|---|---|---|---|---|---|']
    for r in stacked:
      one = next((o for o in stacked if o['model'] == r['model']
                  and o['devices'] == r['devices'] and o.get('replicas', 1) == 1), None)
      ratio = '' if one is None else f"{r['wall_s'] / one['wall_s']:.2f}x"
      lines.append(f"| {r['model']} | {r['devices']} | {r.get('replicas', 1)} | "
                   f"{r['wall_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {ratio} | "
                   f"{r['wall_s'] / r.get('replicas', 1):.1f} |")
  return '\n'.join(lines)


def main(argv=None):
  args = parse(argv)
  if args.worker:
    rows = torch_worker(args) if args.worker == 'torch' else jax_worker(
        args, int(args.worker.split(':')[1]))
    with open(args.result, 'w') as f:
      json.dump(rows, f)
    return
  started = time.time()
  load_before = os.getloadavg()
  rows, flags_used = [], {}
  for n in csv(args.devices, int):
    extra = (args.xla_flags + f' --xla_force_host_platform_device_count={n}').strip()
    got, flags_used[n] = spawn(args, f'jax:{n}', extra)
    rows += got
  have_torch = subprocess.run([sys.executable, '-c', 'import torch'],
                              capture_output=True).returncode == 0
  ran_torch = args.torch == 'on' or (args.torch == 'auto' and have_torch)
  if ran_torch:
    got, _ = spawn(args, 'torch', '')
    rows += got
  import jax
  backend = jax.default_backend()
  accelerator = '' if backend == 'cpu' else jax.devices()[0].device_kind
  meta = {'command': 'python ' + ' '.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
          'date': time.strftime('%Y-%m-%d %H:%M:%S'), 'machine': machine(), 'backend': backend,
          'accelerator': accelerator,
          'versions': versions(), 'xla_flags': flags_used, 'load_before': load_before,
          'load_after': os.getloadavg(), 'seconds': round(time.time() - started, 1),
          'args': {k: v for k, v in vars(args).items() if k not in ('worker', 'result')}}
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  m = meta['machine']
  md = (f"Command: `{meta['command']}`  \n"
        f"Date: {meta['date']}; machine: {m['cpu']}, {m['cores']} cores; backend: {backend}"
        f"{' (' + accelerator + ')' if accelerator else ''}; "
        f"load average before/after: {load_before[0]:.2f} / {meta['load_after'][0]:.2f}  \n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}  \n"
        f"XLA_FLAGS: {'; '.join(f'{k} dev: `{v}`' for k, v in flags_used.items())}  \n"
        + (f"PyTorch: {args.torch_device}, {args.torch_threads} threads; " if ran_torch
           else 'PyTorch: not run; ') +
        f"img/s after warm-up, best of {args.repeats}; "
        "eval img/s counts forwards (clean + triggered).\n\n" + table(rows) + '\n')
  with open(args.out + '.md', 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
