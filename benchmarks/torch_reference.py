"""PyTorch eager reference for the nad-jax benchmark (torch is optional).

The models are written here in the layouts nad-jax mirrors: WideResNet-16-1 as in
xternalz/WideResNet-pytorch (the NAD authors' copy) and BackdoorBench's
PreActResNet18. The NAD stage (`nad_stage`) follows the official NAD code: a
DataLoader that augments each image on the host in numpy (random crop with 4
pixels of zero padding, horizontal flip, one 3x3 Cutout hole), float32, SGD
with Nesterov momentum, and a clean plus a triggered test pass after every
epoch and once before. `setup(..., device='cuda')` runs it on a GPU, batches moved
there as the official code's `.cuda()` does.
"""

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEVICE = torch.device('cpu')  # set by setup()


# ------------------------------------------------------------------------------ models

class WideBasic(nn.Module):
  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal = in_planes == out_planes and stride == 1
    self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride,
                                                          0, bias=False)

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    shortcut = x if self.equal else self.convShortcut(pre)
    y = self.conv2(F.relu(self.bn2(self.conv1(pre))))
    return shortcut + y


class Group(nn.Module):
  def __init__(self, n, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBasic(in_planes if i == 0 else out_planes, out_planes,
                                           stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """Returns (group1, group2, group3, logits) like the NAD authors' model."""

  def __init__(self, depth=16, widen_factor=1, num_classes=10):
    super().__init__()
    w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
    self.block1 = Group(n, w[0], w[1], 1)
    self.block2 = Group(n, w[1], w[2], 2)
    self.block3 = Group(n, w[2], w[3], 2)
    self.bn1 = nn.BatchNorm2d(w[3])
    self.fc = nn.Linear(w[3], num_classes)

  def forward(self, x):
    g1 = self.block1(self.conv1(x))
    g2 = self.block2(g1)
    g3 = self.block3(g2)
    out = F.adaptive_avg_pool2d(F.relu(self.bn1(g3)), 1).flatten(1)
    return g1, g2, g3, self.fc(out)


class PreActBlock(nn.Module):
  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, 'shortcut') else x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class PreActResNet18(nn.Module):
  """BackdoorBench's PreActResNet18; returns (group2, group3, group4, logits)."""

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    layers, in_planes = [], 64
    for planes, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
      layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride),
                                  PreActBlock(planes, planes, 1)))
      in_planes = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    g1 = self.layer1(self.conv1(x))
    g2 = self.layer2(g1)
    g3 = self.layer3(g2)
    g4 = self.layer4(g3)
    out = F.adaptive_avg_pool2d(g4, 1).flatten(1)
    return g2, g3, g4, self.linear(out)


MODELS = {'wrn16_1': WideResNet, 'preact_resnet18': PreActResNet18}


# -------------------------------------------------------------------------- NAD pieces

def attention(fm, p=2.0):
  am = fm.abs().pow(p).mean(1).view(fm.size(0), -1)  # the official AT: mean over channels
  return F.normalize(am, dim=1)


def at_loss(fs, ft, p=2.0):
  return (attention(fs, p) - attention(ft, p)).pow(2).mean()


BETAS = (500.0, 1000.0, 1000.0)


def optimizer(model, lr=0.1):
  return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4,
                         nesterov=True)


def train_step(model, opt, x, y):
  model.train()
  opt.zero_grad(set_to_none=True)
  loss = F.cross_entropy(model(x)[-1], y)
  loss.backward()
  opt.step()
  return loss


def nad_step(student, teacher, opt, x, y):
  student.train()
  opt.zero_grad(set_to_none=True)
  *fs, logits = student(x)
  with torch.no_grad():
    *ft, _ = teacher(x)
  loss = F.cross_entropy(logits, y) + sum(b * at_loss(s, t) for b, s, t in zip(BETAS, fs, ft))
  loss.backward()
  opt.step()
  return loss


@torch.no_grad()
def eval_forward(model, x):
  model.eval()
  return model(x)[-1].argmax(1)


def setup(threads, device='cpu'):
  global DEVICE
  DEVICE = torch.device(device)
  torch.set_num_threads(threads)
  torch.manual_seed(0)


def sync():
  """Waits for the GPU's queued work, so that host timers measure it."""
  if DEVICE.type == 'cuda':
    torch.cuda.synchronize()


def time_steps(kind, model_name, batch, steps, warmup=1):
  """Seconds per step of `kind` ('train', 'nad' or 'eval') after `warmup` steps."""
  model = MODELS[model_name]().to(DEVICE)
  x = torch.randn(batch, 3, 32, 32, device=DEVICE)
  y = torch.randint(0, 10, (batch,), device=DEVICE)
  if kind == 'train':
    opt = optimizer(model)
    fn = lambda: train_step(model, opt, x, y)
  elif kind == 'nad':
    teacher = MODELS[model_name]().to(DEVICE).eval()
    for q in teacher.parameters():
      q.requires_grad_(False)
    opt = optimizer(model)
    fn = lambda: nad_step(model, teacher, opt, x, y)
  else:
    fn = lambda: eval_forward(model, x)
  start = time.perf_counter()
  for _ in range(warmup):
    fn()
  sync()
  warm = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  sync()
  return (time.perf_counter() - start) / steps, warm


# ------------------------------------------------------------------- the whole NAD stage

class AugmentedSet(torch.utils.data.Dataset):
  """The official pipeline's per-image host augmentation, in numpy."""

  def __init__(self, images, labels, cutout=3, seed=0):
    self.images, self.labels, self.cutout = images, labels, cutout
    self.rng = np.random.default_rng(seed)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    rng = self.rng
    image = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))
    top, left = rng.integers(0, 9, 2)
    image = image[top:top + 32, left:left + 32]
    if rng.random() < 0.5:
      image = image[:, ::-1]
    image = image.astype(np.float32) / 255.0
    cy, cx = rng.integers(0, 32, 2)
    h = self.cutout // 2
    image[max(0, cy - h):cy + h + 1, max(0, cx - h):cx + h + 1] = 0.0
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.labels[i])


def grid_trigger(images):
  """BadNets 3x3 grid in the bottom-right corner (uint8 NHWC)."""
  out = images.copy()
  pattern = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], np.uint8)
  out[:, -4:-1, -4:-1, :] = pattern[:, :, None]
  return out


def nad_stage(model_name, train_images, train_labels, test_images, test_labels, epochs=20,
              batch=64, eval_batch=64, target=5, log=print):
  """The official NAD stage: returns dict of wall seconds (total, train, eval) and accuracies."""
  student, teacher = MODELS[model_name]().to(DEVICE), MODELS[model_name]().to(DEVICE).eval()
  for q in teacher.parameters():
    q.requires_grad_(False)
  opt = optimizer(student)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)
  loader = torch.utils.data.DataLoader(AugmentedSet(train_images, train_labels), batch_size=batch,
                                       shuffle=True, drop_last=True)
  nontarget = test_labels != target
  clean = torch.from_numpy(test_images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
                           ).to(DEVICE)
  bad = torch.from_numpy(grid_trigger(test_images[nontarget]).transpose(0, 3, 1, 2)
                         .astype(np.float32) / 255.0).to(DEVICE)
  clean_y = torch.from_numpy(test_labels.astype(np.int64)).to(DEVICE)

  def evaluate():
    correct = hits = 0
    for i in range(0, len(clean), eval_batch):
      correct += (eval_forward(student, clean[i:i + eval_batch]) == clean_y[i:i + eval_batch]).sum()
    for i in range(0, len(bad), eval_batch):
      hits += (eval_forward(student, bad[i:i + eval_batch]) == target).sum()
    return 100.0 * float(correct) / len(clean), 100.0 * float(hits) / len(bad)

  t_train = t_eval = 0.0
  start = time.perf_counter()
  acc, asr = evaluate()
  t_eval += time.perf_counter() - start
  for epoch in range(epochs):
    s = time.perf_counter()
    for x, y in loader:
      nad_step(student, teacher, opt, x.to(DEVICE), y.to(DEVICE))
    sched.step()
    sync()
    t_train += time.perf_counter() - s
    s = time.perf_counter()
    acc, asr = evaluate()
    t_eval += time.perf_counter() - s
    log(f'  torch epoch {epoch + 1}/{epochs} acc {acc:.2f} asr {asr:.2f}')
  return {'wall_s': time.perf_counter() - start, 'train_s': t_train, 'eval_s': t_eval,
          'acc': acc, 'asr': asr}
