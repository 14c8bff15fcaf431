"""PyTorch reference of the FID Inception-v3 (written from the pytorch-fid / torch-fidelity
semantics; used by the parity tests and to build `.pth` files with the official key names).

State-dict keys and shapes are those of `pt_inception-2015-12-05-6726825d.pth`
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight` [1008, 2048],
...). `TorchInceptionV3.features(images uint8 [N, 3, H, W])` returns 'pool', 'logits_unbiased'
and 'spatial' (Mixed_6d.branch1x1, first 7 channels, flattened (h, w, c)) as float32.
Needs torch only (no torchvision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg3(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, 1)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([
      self.branch1x1(x),
      self.branch5x5_2(self.branch5x5_1(x)),
      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
      self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([
      self.branch3x3(x),
      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
      F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, 1)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    d = self.branch7x7dbl_1(x)
    for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
              self.branch7x7dbl_5):
      d = m(d)
    return torch.cat([
      self.branch1x1(x),
      self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
      d,
      self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
  def __init__(self, cin, use_max_pool):
    super().__init__()
    self.use_max_pool = use_max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    a = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max_pool else _avg3(x)
    return torch.cat([
      self.branch1x1(x),
      torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
      torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
      self.branch_pool(pooled)], 1)


def resize_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
  """TF 1.x bilinear resize (align_corners=False) of float [N, C, H, W]: source coordinate
  i * in / out in float32, floor / +1 clamped neighbours, x then y interpolation."""

  def table(n_in):
    g = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
    lo = g.long()
    return lo, (lo + 1).clamp_max(n_in - 1), g - lo.float()

  ylo, yhi, dy = table(x.shape[2])
  xlo, xhi, dx = table(x.shape[3])
  top, bottom = x[:, :, ylo], x[:, :, yhi]
  r0 = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
  r1 = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
  return r0 + (r1 - r0) * dy.view(1, 1, size, 1)


class TorchInceptionV3(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = BlockA(192, 32)
    self.Mixed_5c = BlockA(256, 64)
    self.Mixed_5d = BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b = BlockC(768, 128)
    self.Mixed_6c = BlockC(768, 160)
    self.Mixed_6d = BlockC(768, 160)
    self.Mixed_6e = BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b = BlockE(1280, use_max_pool=False)
    self.Mixed_7c = BlockE(2048, use_max_pool=True)
    self.fc = nn.Linear(2048, 1008)
    self.eval()

  @torch.no_grad()
  def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3
    x = (resize_tf1(images.float()) - 128) / 128
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(
      self.Mixed_5b(x))))))
    spatial = self.Mixed_6d.branch1x1(x)             # TF 'mixed_6/conv'
    x = self.Mixed_6d(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = x.mean(dim=(2, 3))
    return {
      'pool': pool,
      'logits_unbiased': pool @ self.fc.weight.T,
      'spatial': spatial[:, :7].permute(0, 2, 3, 1).reshape(len(images), -1),
    }


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """He-scaled random conv/linear weights and non-trivial BatchNorm parameters and running
  statistics, so that activations stay O(1) through the 94 layers."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d | nn.Linear):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(1 + 0.2 * torch.rand(n, generator=g))
  return model
