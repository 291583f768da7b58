"""PyTorch reference models for the tests: the xternalz WideResNet and BackdoorBench's PreActResNet18.

Written here from the published architectures, with their state_dict names, so that
checkpoints made with them have the layouts nad_jax.torch_io reads.
"""

import torch

nn, F = torch.nn, torch.nn.functional


class TorchWideBlock(nn.Module):
  """xternalz/WideResNet-pytorch BasicBlock (no dropout)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.equal = cin == cout
    self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = x if self.equal else self.convShortcut(out)
    return shortcut + self.conv2(F.relu(self.bn2(self.conv1(out))))


class TorchGroup(nn.Module):
  def __init__(self, cin, cout, stride, n):
    super().__init__()
    self.layer = nn.Sequential(*[TorchWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                 for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class TorchWideResNet(nn.Module):
  def __init__(self, depth, k, num_classes=10):
    super().__init__()
    n, widths = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = TorchGroup(widths[0], widths[1], 1, n)
    self.block2 = TorchGroup(widths[1], widths[2], 2, n)
    self.block3 = TorchGroup(widths[2], widths[3], 2, n)
    self.bn1, self.fc = nn.BatchNorm2d(widths[3]), nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1))


class TorchPreActBlock(nn.Module):
  """BackdoorBench models/preact_resnet.py PreActBlock."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, 'shortcut') else x
    return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class TorchPreActResNet18(nn.Module):
  def __init__(self, num_classes=10, head_norm=False):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    cin = 64
    for i, (width, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
      setattr(self, f'layer{i}', nn.Sequential(TorchPreActBlock(cin, width, stride),
                                               TorchPreActBlock(width, width, 1)))
      cin = width
    if head_norm:
      self.bn = nn.BatchNorm2d(512)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
    if hasattr(self, 'bn'):
      x = F.relu(self.bn(x))
    return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize(module, seed=0):
  """Random weights and random BatchNorm statistics, in eval mode."""
  torch.manual_seed(seed)
  for m in module.modules():
    if isinstance(m, nn.BatchNorm2d):
      for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.2, 0.2)),
                          (m.running_mean, (-0.2, 0.2)), (m.running_var, (0.5, 1.5))):
        t.data.uniform_(lo, hi)
      m.num_batches_tracked.fill_(7)
    elif isinstance(m, nn.Linear):
      m.weight.data.normal_()  # logits of order 1, so that 1e-4 is a tight bound
  return module.eval()


