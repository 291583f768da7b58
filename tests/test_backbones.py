"""BackdoorBench's resnet18 and vgg19_bn (torchvision's networks) against PyTorch references.

torchvision is not a dependency, so the references below rebuild torchvision's
`resnet18` and `vgg19_bn` by hand with torchvision's module names: their
state_dict keys are torchvision's (checked against known keys and counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nad_jax import models, torch_io
from nad_jax.models import vgg

pytestmark = pytest.mark.slow  # whole-pipeline runs: `pytest -m "not slow"` skips them

torch = pytest.importorskip('torch', reason="torch is not installed (pip install 'nad-jax[torch]')")
nn, F = torch.nn, torch.nn.functional

NUM_CLASSES = 10
TOL = dict(atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ PyTorch references

class TorchBasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class TorchResNet18(nn.Module):
  """torchvision.models.resnet18(num_classes=...): 7x7 stride-2 stem and max-pool kept."""

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (cout, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      setattr(self, f'layer{i}', nn.Sequential(TorchBasicBlock(cin, cout, stride),
                                               TorchBasicBlock(cout, cout, 1)))
      cin = cout
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchVGG19BN(nn.Module):
  """torchvision.models.vgg19_bn(num_classes=...) (cfgs['E'], batch_norm=True)."""

  def __init__(self, num_classes=10):
    super().__init__()
    layers, cin = [], 3
    for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
              512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M']:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                   nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=0.5),
        nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# Modules whose outputs the Flax models sow, by sown name.
TORCH_SOWN = {
    'resnet18': {f'group{i}': f'layer{i}' for i in range(1, 5)},
    # the last ReLU of each block, just before its max-pool
    'vgg19_bn': {'group1': 'features.5', 'group2': 'features.12', 'group3': 'features.25',
                 'group4': 'features.38', 'group5': 'features.51'},
}
EXPECTED_SOWN = {  # (H, W, C) at 32x32
    'resnet18': {'group1': (8, 8, 64), 'group2': (4, 4, 128), 'group3': (2, 2, 256),
                 'group4': (1, 1, 512)},
    'vgg19_bn': {'group1': (32, 32, 64), 'group2': (16, 16, 128), 'group3': (8, 8, 256),
                 'group4': (4, 4, 512), 'group5': (2, 2, 512)},
}
# torchvision's state_dict: number of entries (num_batches_tracked included) and some names.
TORCHVISION_KEYS = {
    'resnet18': (122, ['conv1.weight', 'bn1.running_var', 'layer1.0.conv1.weight',
                       'layer2.0.downsample.0.weight', 'layer4.0.downsample.1.running_mean',
                       'layer4.1.bn2.bias', 'fc.weight', 'fc.bias']),
    'vgg19_bn': (118, ['features.0.weight', 'features.0.bias', 'features.1.running_mean',
                       'features.49.weight', 'features.50.num_batches_tracked',
                       'classifier.0.weight', 'classifier.3.bias', 'classifier.6.weight']),
}
TORCH_MODELS = {'resnet18': TorchResNet18, 'vgg19_bn': TorchVGG19BN}


def _set_bn_momentum(model, momentum):
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = momentum


def _random_torch_model(name, seed):
  """A reference in eval mode with seeded weights (O(1) logits) and non-default BatchNorms.

  Running statistics are those of one random batch (so activations stay scaled
  through 16-19 layers), then perturbed; BN affines are random too. Built
  without PyTorch's default initialisation (slow for VGG's 120 M Linear weights).
  """
  with torch.device('meta'):
    model = TORCH_MODELS[name](NUM_CLASSES)
  model.to_empty(device='cpu')
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                       * (2.0 / m.weight[0].numel()) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives its statistics
    model.train()
    model(torch.randn(8, 3, 32, 32, generator=gen))
    _set_bn_momentum(model, 0.1)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.05)
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)
  return model.eval()


def _abstract(model, shape=(2, 32, 32, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.fixture(scope='module', params=sorted(TORCH_MODELS))
def pair(request):
  """(name, torch model in eval mode, its state_dict as numpy, Flax module, imported variables)."""
  name = request.param
  tmodel = _random_torch_model(name, seed=len(name))
  state_dict = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}  # not shared
  model = models.build_model(name, NUM_CLASSES)
  variables = torch_io.from_state_dict(state_dict, _abstract(model))
  return name, tmodel, state_dict, model, jax.tree.map(jnp.asarray, variables)


def _inputs(seed, n=2, size=32):
  x = np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))


def test_reference_keys_are_torchvision(pair):
  name, _, state_dict, model, variables = pair
  count, some = TORCHVISION_KEYS[name]
  assert len(state_dict) == count
  assert set(some) <= set(state_dict)
  assert torch_io.family_of(variables) == {'resnet18': 'resnet', 'vgg19_bn': 'vgg'}[name]


def test_eval_logits_and_sown_layers_match_torch(pair):
  name, tmodel, _, model, variables = pair
  x_torch, x = _inputs(1)
  taken = {}
  modules = dict(tmodel.named_modules())
  hooks = [modules[m].register_forward_hook(
      lambda mod, inp, out, key=key: taken.__setitem__(key, out.detach().clone().numpy()))
           for key, m in TORCH_SOWN[name].items()]
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x_torch)).numpy()
  for hook in hooks:
    hook.remove()
  logits, sown = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))(
      variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, NUM_CLASSES)
  assert np.std(want) > 0.1  # the comparison is not vacuous
  np.testing.assert_allclose(np.asarray(logits), want, **TOL)
  sown = {k: np.asarray(v[0]) for k, v in sown['intermediates'].items()}
  assert {k: v.shape[1:] for k, v in sown.items()} == EXPECTED_SOWN[name]
  for key, value in sown.items():
    np.testing.assert_allclose(value, taken[key].transpose(0, 2, 3, 1), **TOL)
  for layer in model.distill_layers:  # NAD's default maps have spatial extent at 32x32
    assert sown[layer].shape[1] > 1 and sown[layer].shape[2] > 1, layer
  assert len(model.distill_layers) == 3


def test_train_mode_matches_torch_without_rngs(pair):
  """train=True uses batch statistics; without a 'dropout' RNG the classifier does not drop."""
  name, tmodel, _, model, variables = pair
  x_torch, x = _inputs(2, n=4)
  tmodel.train()
  tmodel.apply(lambda m: m.eval() if isinstance(m, nn.Dropout) else None)
  _set_bn_momentum(tmodel, 0.0)  # keeps the running statistics
  try:
    with torch.no_grad():
      want = tmodel(torch.from_numpy(x_torch)).numpy()
  finally:
    _set_bn_momentum(tmodel, 0.1)
    tmodel.eval()
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, new = apply(variables, x)
  np.testing.assert_allclose(np.asarray(logits), want, atol=5e-4, rtol=5e-4)
  assert jax.tree.structure(new['batch_stats']) == jax.tree.structure(variables['batch_stats'])
  if name == 'vgg19_bn':  # a 'dropout' RNG turns torchvision's dropout on
    dropped, _ = jax.jit(lambda v, x, key: model.apply(
        v, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}))(
            variables, x, jax.random.key(0))
    assert not np.allclose(np.asarray(dropped), np.asarray(logits))


def test_round_trip_loads_strictly_into_torch(pair, tmp_path):
  name, _, state_dict, model, variables = pair
  exported = torch_io.to_state_dict(variables)
  assert set(exported) == {k for k in state_dict if not k.endswith('num_batches_tracked')}
  path = tmp_path / f'{name}.pth'
  torch_io.save(variables, str(path))
  with torch.device('meta'):
    fresh = TORCH_MODELS[name](NUM_CLASSES)
  fresh.load_state_dict(torch.load(path, weights_only=True), strict=True, assign=True)
  for key, value in fresh.state_dict().items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(value.numpy(), state_dict[key], err_msg=key)
  # the file (torchvision's names, num_batches_tracked included) loads back
  loaded = torch_io.load(str(path), _abstract(model))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_other_family_is_rejected():
  """A resnet18 checkpoint does not fit vgg19_bn (and vice versa) with a CheckpointError."""
  resnet = {k: v.numpy() for k, v in TorchResNet18(NUM_CLASSES).state_dict().items()}
  with pytest.raises(torch_io.CheckpointError, match='vgg model'):
    torch_io.from_state_dict(resnet, _abstract(models.build_model('vgg19_bn', NUM_CLASSES)))
  preact = _abstract(models.build_model('preact_resnet18', NUM_CLASSES))
  assert torch_io.family_of(preact) == 'preact_resnet'
  with pytest.raises(torch_io.CheckpointError, match='preact_resnet model'):
    torch_io.from_state_dict(resnet, preact)


@pytest.mark.parametrize('size', [1, 2, 3, 5, 7, 9, 14])
def test_adaptive_avg_pool_matches_torch(size):
  x = np.random.default_rng(size).normal(size=(2, 4, size, size + 1)).astype(np.float32)
  want = F.adaptive_avg_pool2d(torch.from_numpy(x), (7, 7)).numpy().transpose(0, 2, 3, 1)
  got = vgg.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (7, 7))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6)


def test_64x64_matches_torch(pair):
  """At 64x64 ResNet's layer4 is 2x2, and VGG's 7x7 adaptive pool overlaps the 2x2 map's bins."""
  _, tmodel, _, model, variables = pair
  x_torch, x = _inputs(4, n=1, size=64)
  with torch.no_grad():
    want = tmodel(torch.from_numpy(x_torch)).numpy()
  # Running statistics from 32x32 inputs give larger logits here: tolerance relative to their scale.
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, x)), want,
                             atol=1e-4 * scale, rtol=1e-4)
