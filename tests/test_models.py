"""Sown activations of every registered model, and the registry's errors."""

import jax
import jax.numpy as jnp
import pytest

from nad_jax import models

EXPECTED = {
    'wrn16_1': {'group1': (32, 32, 16), 'group2': (16, 16, 32), 'group3': (8, 8, 64)},
    'wrn16_2': {'group1': (32, 32, 32), 'group2': (16, 16, 64), 'group3': (8, 8, 128)},
    'wrn40_1': {'group1': (32, 32, 16), 'group2': (16, 16, 32), 'group3': (8, 8, 64)},
    'wrn40_2': {'group1': (32, 32, 32), 'group2': (16, 16, 64), 'group3': (8, 8, 128)},
    'preact_resnet18': {'group1': (32, 32, 64), 'group2': (16, 16, 128),
                        'group3': (8, 8, 256), 'group4': (4, 4, 512)},
    'tiny': {'group1': (32, 32, 8), 'group2': (16, 16, 16), 'group3': (8, 8, 32)},
    # torchvision's ImageNet stem at 32x32: layer4 is 1x1, so NAD distils groups 1-3.
    'resnet18': {'group1': (8, 8, 64), 'group2': (4, 4, 128), 'group3': (2, 2, 256),
                 'group4': (1, 1, 512)},
    'vgg19_bn': {'group1': (32, 32, 64), 'group2': (16, 16, 128), 'group3': (8, 8, 256),
                 'group4': (4, 4, 512), 'group5': (2, 2, 512)},
}


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_sown_shapes(name):
  model = models.build_model(name, num_classes=7)
  x = jnp.zeros((2, 32, 32, 3))

  def forward():
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(variables, x, train=False, mutable=['intermediates'])

  logits, sown = jax.eval_shape(forward)
  assert logits.shape == (2, 7)
  shapes = {k: v[0].shape[1:] for k, v in sown['intermediates'].items()}
  assert shapes == EXPECTED[name]
  assert set(model.distill_layers) <= set(shapes)
  # A 1x1 attention map normalises to 1 in student and teacher alike: no AT term.
  assert all(shapes[g][0] * shapes[g][1] > 1 for g in model.distill_layers)


def test_wrn_parameter_count_and_depth():
  model = models.build_model('wrn16_1', 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert 170_000 < count < 180_000  # 0.175 M parameters (DESIGN.md)
  assert [k for k in variables['params']['block2']] == ['layer_0', 'layer_1']
  assert 'convShortcut' in variables['params']['block2']['layer_0']


def test_unknown_model_names_the_choices():
  with pytest.raises(KeyError, match='wrn16_1'):
    models.build_model('resnet999', 10)


def test_unknown_conv_names_the_choices():
  with pytest.raises(KeyError, match="'auto', 'xla', 'onednn'"):
    models.build_model('wrn16_1', 10, conv='cudnn')


@pytest.mark.parametrize('name', ['wrn16_1', 'preact_resnet18'])
def test_bfloat16_computes_in_bf16_with_float32_params_and_logits(name):
  """model.dtype 'bfloat16' (XLA's convolutions here): bf16 activations, float32 params,
  BatchNorm statistics and logits, as on GPU."""
  model = models.build_model(name, 10, 'bfloat16', 'xla')
  x = jnp.zeros((2, 32, 32, 3))

  def forward():
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=True,
                                  mutable=['intermediates', 'batch_stats'])

  variables, (logits, state) = jax.eval_shape(forward)
  assert logits.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert {v.dtype for v in jax.tree.leaves(state['batch_stats'])} == {jnp.dtype(jnp.float32)}
  assert {v.dtype for v in jax.tree.leaves(state['intermediates'])} == {jnp.dtype(jnp.bfloat16)}
