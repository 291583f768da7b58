"""Fine-pruning (FP; Liu, Dolan-Gavitt & Garg, "Fine-Pruning", RAID 2018).

Prune the channels of the last convolutional layer in order of increasing mean
activation on clean data, until clean accuracy falls by a margin; then fine-tune
with the pruned channels kept pruned.

Which activation is pruned. In the pre-activation networks here (WRN, the tiny
net; PreAct-ResNet with `head_norm`) the last convolution's output (the sum of
the last residual block, sown as the last group) goes through the final
BN-ReLU and the global average pool into the classifier. The activation of that
layer is the post-ReLU map, and its spatial mean is exactly the classifier's
input. So a channel's mean activation is the mean of its classifier input over
the clean images, and pruning it means removing it from the classifier's input.

How it is removed. `PrunedModel` multiplies the rows of the head's kernel that
read the pruned channels by 0 inside `apply`, which is the same as multiplying
the head's input by a 0/1 channel mask. The logits then do not depend on those
channels at all, in training and in inference (masking the group output before
the final BatchNorm would not do: a zeroed channel comes out of BN as a
constant, its bias). The masked rows get zero gradient, so fine-tuning can not
bring the channels back; the returned variables have those rows zeroed, so the
plain model computes the pruned network.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nad_jax import checkpoint as ckpt_lib
from nad_jax import stages
from nad_jax import streams
from nad_jax import train as train_lib

# The pruning plan in FP's folder: the run that resumes or restores the stage prunes the
# channels its checkpoints were trained with, whatever its own convolutions and evaluation
# batches would rank.
PLAN = 'prune_plan.json'


def mask_head(variables, head: str, keep) -> dict:
  """`variables` with the head kernel's input rows multiplied by `keep` (C,) of 0/1."""
  params = variables['params']
  kernel = params[head]['kernel']
  kernel = kernel * jnp.asarray(keep, kernel.dtype)[:, None]
  return {**variables, 'params': {**params, head: {**params[head], 'kernel': kernel}}}


class PrunedModel:
  """A model whose head ignores the input channels where `keep` is 0 (see the module doc).

  It has the wrapped model's variables and its `apply`/`init` signature, so the
  training loop and the evaluation take it in place of the model.
  """

  def __init__(self, model: nn.Module, head: str, keep: np.ndarray):
    self.model, self.head, self.keep = model, head, np.asarray(keep, np.float32)

  def apply(self, variables, *args, **kwargs):
    """The wrapped model's `apply` with the pruned head rows zeroed."""
    return self.model.apply(mask_head(variables, self.head, self.keep), *args, **kwargs)

  def init(self, *args, **kwargs):
    """The wrapped model's `init`."""
    return self.model.init(*args, **kwargs)

  def __getattr__(self, name):  # distill_layers, num_classes, ...
    return getattr(self.model, name)


def _capture_head(store: list):
  """An interceptor that records (name, input) of every Dense layer called."""
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, nn.Dense):
      store.append((context.module.name, args[0]))
    return next_fun(*args, **kwargs)
  return interceptor


def head_features(model: nn.Module, variables, images, normalize, batch_size: int = 500):
  """(head name, the head's input features (N, C), logits (N, K)) on uint8 `images`.

  The head is the last Dense layer the model calls (WRN's `fc`).
  """
  names = []

  def forward(variables, x):
    store = []
    with nn.intercept_methods(_capture_head(store)):
      logits = model.apply(variables, normalize(x.astype(jnp.float32)), train=False)
    names.append(store[-1][0])
    return store[-1][1].astype(jnp.float32), logits

  forward = jax.jit(forward)
  chunks = np.array_split(np.asarray(images), max(1, -(-len(images) // batch_size)))
  outs = [jax.device_get(forward(variables, chunk)) for chunk in chunks if len(chunk)]
  head = names[0]
  if head not in variables['params']:
    raise ValueError(f'fine-pruning: the head {head!r} is not a top-level layer of the model')
  return head, np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def prune_plan(features_rank: np.ndarray, features_hold: np.ndarray, labels_hold: np.ndarray,
               kernel: np.ndarray, bias: np.ndarray, acc_drop: float) -> dict:
  """Channel order by increasing mean activation, held-out accuracy after pruning the first
  k (k = 0..C-1), and how many to prune: the largest k with every accuracy up to it at
  least the unpruned one minus `acc_drop` (percentage points)."""
  activation = features_rank.mean(axis=0)
  order = np.argsort(activation, kind='stable')
  num = len(order)
  keep = np.ones((num, num), np.float32)  # row k: the first k channels of `order` pruned
  for k in range(1, num):
    keep[k:, order[k - 1]] = 0.0
  logits = np.einsum('nc,kc,cj->knj', features_hold, keep, kernel) + bias
  accuracy = 100.0 * (logits.argmax(-1) == labels_hold[None]).mean(axis=1)
  ok = accuracy >= accuracy[0] - acc_drop
  count = int(np.argmin(ok)) - 1 if not ok.all() else num - 1
  return {'order': order.tolist(), 'mean_activation': activation.tolist(),
          'holdout_acc': accuracy.round(2).tolist(), 'pruned': max(count, 0),
          'keep': keep[max(count, 0)]}


def plan_for(ctx: stages.Context, student, clean) -> dict:
  """`prune_plan` of `student` on the clean subset, with 'head' (the pruned layer's name) and
  'keep' as a list: the channels are ranked on the subset less a seeded
  `fp.holdout_fraction`, whose accuracy the criterion reads (`fp.acc_drop` points)."""
  config = ctx.config
  images, labels, _ = clean
  order = streams.rng(config.seed, 'fp_holdout').permutation(len(images))
  holdout = max(1, int(round(config.fp.holdout_fraction * len(images))))
  hold, rank = order[:holdout], order[holdout:]
  if not len(rank):
    rank = hold
  batch = config.data.eval_batch_size
  head, f_rank, _ = head_features(ctx.model, student, images[rank], ctx.normalize, batch)
  _, f_hold, _ = head_features(ctx.model, student, images[hold], ctx.normalize, batch)
  params = jax.device_get(student['params'][head])
  plan = prune_plan(f_rank, f_hold, labels[hold], np.asarray(params['kernel'], np.float32),
                    np.asarray(params['bias'], np.float32), config.fp.acc_drop)
  return {**plan, 'head': head, 'keep': plan['keep'].tolist()}


def kept_plan(folder: str | None, params) -> dict | None:
  """The plan (`plan_for`'s) that FP's stage folder keeps for its checkpoints.

  Args:
    folder: FP's stage folder; None: the run keeps no folders.
    params: the model's params (arrays or shapes), which the plan must fit.

  Returns:
    The plan; None where the folder holds no finished epoch or no plan (folders older
    than PLAN).

  Raises:
    ConfigError: the plan is unreadable or does not fit the model.
  """
  path = os.path.join(folder, PLAN) if folder is not None else None
  if path is None or not ckpt_lib.finished_epochs(folder) or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      plan = json.load(f)
    fits = (all(key in plan for key in ('head', 'keep', 'order', 'pruned', 'holdout_acc'))
            and len(plan['keep']) == np.shape(params[plan['head']]['kernel'])[0])
  except (OSError, ValueError, TypeError, KeyError, AttributeError):
    fits = False
  if not fits:
    raise stages.ConfigError(f'{path} is unreadable or does not fit the model; delete the '
                             f'folder {folder} to prune and fine-tune again')
  return plan


def fine_prune(ctx: stages.Context, student, clean, name: str = 'fp') -> stages.StageResult:
  """Prunes `student` on the clean subset, then fine-tunes it with `config.fp`.

  `clean` is (images, labels, mask) of the clean subset: `plan_for` prunes on it, and the
  fine-tuning uses the whole subset, with NAD's batches.

  Args:
    ctx: the stage Context.
    student: the backdoored model's {'params', 'batch_stats'}.
    clean: the clean subset (images, labels, mask), as `stages.clean_data` returns.
    name: the stage's name and folder.

  Returns:
    StageResult of the pruned, fine-tuned model (the pruned head rows zeroed, so the
    plain model computes it); history's epoch 0 is the pruned model before
    fine-tuning; info: the head, the channel order, held-out accuracies, the pruned
    channels. A run that resumes or restores the stage prunes the channels of the plan
    its folder records (PLAN), not the ones it would rank itself.

  Raises:
    ValueError: the model's last Dense layer is not a top-level layer.
    ConfigError: the plan its folder keeps is unreadable or does not fit (`kept_plan`).
  """
  folder = os.path.join(ctx.workdir, name) if ctx.workdir is not None else None
  plan = kept_plan(folder, student['params'])
  if plan is not None:
    source = f'as its folder records, {PLAN}'
  else:
    plan = plan_for(ctx, student, clean)
    if folder is not None:
      stages.write_json(os.path.join(folder, PLAN), plan)
    source = 'held-out acc {:.1f} -> {:.1f}'.format(plan['holdout_acc'][0],
                                                    plan['holdout_acc'][plan['pruned']])
  head, keep = plan.pop('head'), np.asarray(plan.pop('keep'), np.float32)
  stages.log(f'[{name}] pruning {plan["pruned"]} of {len(keep)} channels of {head!r} input '
             f'({source})')
  model = PrunedModel(ctx.model, head, keep)
  pruned_ctx = ctx._replace(model=model, evaluate=train_lib.make_evaluate(
      model, ctx.mesh, ctx.normalize, ctx.attack, ctx.config.get('scan_epoch')))
  cfg = ctx.config.fp
  trained = stages.train_stage(pruned_ctx, name, cfg, stages.recipe_for(cfg),
                               mask_head(student, head, keep), *clean, None, stream='nad')
  info = {'head': head, 'channels': len(keep), **plan,
          'pruned_channels': plan['order'][:plan['pruned']]}
  return stages.StageResult(mask_head(trained.variables, head, keep), trained.history,
                            trained.timing, info)
