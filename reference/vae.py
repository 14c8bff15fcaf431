"""A PyTorch reference of MAR's KL-16 VAE (LDM AutoencoderKL), written from the spec (needs
`pip install disa_jax[torch]`).

Written for the parity tests from `shared/spec/mar_disa.md` §3.5 (official semantics of
LTH14/mar models/vae.py): NCHW, the official module names and state-dict keys (`encoder.down.
{i}.block.{j}.*`, `decoder.up.{i}.upsample.conv`, `quant_conv`, `post_quant_conv`, ...),
GroupNorm(32, eps 1e-6), swish, asymmetric (right/bottom) padding before the stride-2 conv,
nearest upsampling, single-head 1x1-conv attention with scale C^-1/2. The architecture numbers
come from a `disa_jax.tokenizers.kl16.VAEConfig` (its `attn_levels` are the encoder levels with
attention, i.e. the official `attn_resolutions=(16,)` at resolution 256).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def swish(x):
  return x * torch.sigmoid(x)


def group_norm(c, groups):
  return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout, groups):
    super().__init__()
    self.norm1 = group_norm(cin, groups)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = group_norm(cout, groups)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
    skip = self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x
    return skip + h


class AttnBlock(nn.Module):
  def __init__(self, c, groups):
    super().__init__()
    self.norm = group_norm(c, groups)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q = self.q(h).flatten(2).transpose(1, 2)           # b, hw, c
    k = self.k(h).flatten(2)                           # b, c, hw
    v = self.v(h).flatten(2)                           # b, c, hw
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)   # b, hw(query), hw(key)
    o = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + self.proj_out(o)


class Downsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Level(nn.Module):
  def __init__(self, cin, cout, n_blocks, groups, *, attn, resample):
    super().__init__()
    self.block = nn.ModuleList(
      [ResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks)])
    self.attn = nn.ModuleList([AttnBlock(cout, groups) for _ in range(n_blocks if attn else 0)])
    if resample == 'down':
      self.downsample = Downsample(cout)
    elif resample == 'up':
      self.upsample = Upsample(cout)

  def forward(self, x):
    for j, blk in enumerate(self.block):
      x = blk(x)
      if len(self.attn):
        x = self.attn[j](x)
    if hasattr(self, 'downsample'):
      x = self.downsample(x)
    if hasattr(self, 'upsample'):
      x = self.upsample(x)
    return x


class Mid(nn.Module):
  def __init__(self, c, groups):
    super().__init__()
    self.block_1 = ResnetBlock(c, c, groups)
    self.attn_1 = AttnBlock(c, groups)
    self.block_2 = ResnetBlock(c, c, groups)

  def forward(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    n, g = len(cfg.ch_mult), cfg.num_groups
    chans = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
    self.down = nn.ModuleList([
      Level(cfg.ch if i == 0 else chans[i - 1], chans[i], cfg.num_res_blocks, g,
            attn=i in cfg.attn_levels, resample='down' if i < n - 1 else None)
      for i in range(n)])
    self.mid = Mid(chans[-1], g)
    self.norm_out = group_norm(chans[-1], g)
    self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.embed_dim, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    n, g = len(cfg.ch_mult), cfg.num_groups
    chans = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = nn.Conv2d(cfg.embed_dim, chans[-1], 3, padding=1)
    self.mid = Mid(chans[-1], g)
    self.up = nn.ModuleList([
      Level(chans[min(i + 1, n - 1)], chans[i], cfg.num_res_blocks + 1, g, attn=False,
            resample='up' if i > 0 else None)
      for i in range(n)])
    self.norm_out = group_norm(chans[0], g)
    self.conv_out = nn.Conv2d(chans[0], cfg.out_ch, 3, padding=1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(swish(self.norm_out(h)))


class TorchAutoencoderKL(nn.Module):
  """Reference VAE; `encode(x NCHW) -> (mean, logvar)` (logvar clamped to [-30, 20]),
  `decode(z NCHW) -> images NCHW`."""

  def __init__(self, cfg):
    super().__init__()
    z = cfg.embed_dim
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
    self.post_quant_conv = nn.Conv2d(z, z, 1)

  @torch.no_grad()
  def encode(self, x):
    mean, logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)

  @torch.no_grad()
  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))
