"""PyTorch reference of the official FlowAR (trunk, flow head, Euler sampler) for parity tests.

Written from the official semantics of Qinyu-Allen-Zhao/DiSA `FlowAR_DiSA/models/{flowar.py,
flowmodel.py, sampler.py, rope.py}` (spec `flowar_xar.md` §2-§4); the module and parameter names
reproduce the official state-dict keys (incl. the `mask` and `rope.freqs` buffers), so a state
dict of this model has the official checkpoint format. Differences from the official code that
do not change results: no CUDA, no timm (the gated MLP is written out), no training path, and
`sample_tokens(..., noise=)` replaces every `torch.randn` draw. The sampler keeps the ODE state in
float64 as the official one does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
  def __init__(self, dim, weight=False, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim)) if weight else None

  def forward(self, x):
    y = x.float()
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
    return y if self.weight is None else y * self.weight


class GatedMLP(nn.Module):
  """timm SwiGLU with act_layer=nn.GELU: fc2(gelu(fc1_g(x)) * fc1_x(x))."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1_g = nn.Linear(dim, hidden)
    self.fc1_x = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1_g(x)) * self.fc1_x(x))


class Rope(nn.Module):
  """VisionRotaryEmbeddingFast rebuilt for the token count of the input (16x16 extent)."""

  def __init__(self, half_head_dim, extent=16):
    super().__init__()
    dim = half_head_dim
    self.extent = extent
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    self.register_buffer('freqs', freqs)

  def forward(self, x):
    m = int(math.sqrt(x.shape[2]))
    t = torch.arange(m) / m * self.extent
    f = torch.einsum('i,f->if', t, self.freqs).repeat_interleave(2, dim=-1)
    grid = torch.cat([f[:, None, :].expand(m, m, -1), f[None, :, :].expand(m, m, -1)], dim=-1)
    cos, sin = grid.cos().reshape(m * m, -1), grid.sin().reshape(m * m, -1)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * cos + rot * sin


class Attention(nn.Module):
  def __init__(self, dim, heads, qkv_bias, cached=False):
    super().__init__()
    self.heads, self.hd = heads, dim // heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)
    self.rope = Rope(self.hd // 2)
    self.cached = cached
    self.k = self.v = None

  def clear_cache(self):
    self.k = self.v = None

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.rope(q), self.rope(k)
    if self.cached:
      self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
      self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
      k, v = self.k, self.v
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
  def __init__(self, dim, context_dim, heads):
    super().__init__()
    self.heads, self.hd = heads, dim // heads
    self.q = nn.Linear(dim, dim, bias=False)
    self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)
    self.rope = Rope(self.hd // 2)

  def forward(self, x, c):
    b, n, d = x.shape
    q = self.q(x).reshape(b, n, self.heads, self.hd).permute(0, 2, 1, 3)
    k, v = self.kv(c).reshape(b, n, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v)
    return self.proj(out.permute(0, 2, 1, 3).reshape(b, n, d))


class TrunkBlock(nn.Module):
  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = Attention(dim, heads, qkv_bias=True, cached=True)
    self.mlp = GatedMLP(dim, hidden)
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
    self.dim = dim

  def forward(self, x, c):
    g1, g2, a1, a2, b1, b2 = self.ada_lin(c).view(-1, 1, 6, self.dim).unbind(2)
    x = x + self.attn(self.norm1(x) * (1 + a1) + b1) * g1
    return x + self.mlp(self.norm2(x) * (1 + a2) + b2) * g2


class HeadBlockV1(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = Attention(dim, dim // 64, qkv_bias=False)
    self.mlp = GatedMLP(dim, hidden)
    self.ada_lin = nn.Linear(dim, 6 * dim)
    self.dim = dim

  def forward(self, x, t, c, z):
    b, n, _ = z.shape
    g1, g2, a1, a2, b1, b2 = self.ada_lin(F.silu(t + c)).view(b, n, 6, self.dim).unbind(2)
    x = x + self.attn(self.norm1(x) * (1 + a1) + b1) * g1
    return x + self.mlp(self.norm2(x) * (1 + a2) + b2) * g2


class HeadBlockV2(nn.Module):
  def __init__(self, dim, context_dim, hidden):
    super().__init__()
    self.norm1, self.norm3 = RMSNorm(dim), RMSNorm(dim)
    self.attn = Attention(dim, dim // 64, qkv_bias=False)
    self.crossattn = CrossAttention(dim, context_dim, dim // 64)
    self.norm2_1 = RMSNorm(dim, True)
    self.norm2_2 = RMSNorm(context_dim, True)
    self.mlp = GatedMLP(dim, hidden)
    self.ada_lin_attn = nn.Linear(dim, 3 * dim)
    self.ada_lin_mlp = nn.Linear(dim, 3 * dim)
    self.dim = dim

  def forward(self, x, t, c, z):
    b, n, _ = z.shape
    g1, a1, b1 = self.ada_lin_attn(F.silu(t)).view(b, 1, 3, self.dim).unbind(2)
    g2, a2, b2 = self.ada_lin_mlp(F.silu(c + t)).view(b, n, 3, self.dim).unbind(2)
    x = x + self.attn(self.norm1(x) * (1 + a1) + b1) * g1
    x = x + self.crossattn(self.norm2_1(x), self.norm2_2(z))
    return x + self.mlp(self.norm3(x) * (1 + a2) + b2) * g2


class TimestepEmbedder(nn.Module):
  def __init__(self, dim, freq=256):
    super().__init__()
    self.freq = freq
    self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, tau):
    half = self.freq // 2
    phi = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = tau[:, None].float() * phi[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class FinalLayer(nn.Module):
  def __init__(self, dim, out):
    super().__init__()
    self.norm_final = RMSNorm(dim)
    self.linear = nn.Linear(dim, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
  """SimpleTransformerAdaLN."""

  def __init__(self, in_ch, width, z_dim, depth, cross, hidden):
    super().__init__()
    self.time_embed = TimestepEmbedder(width)
    self.cond_embed = nn.Linear(z_dim, width)
    self.input_proj = nn.Linear(in_ch, width)
    self.res_blocks = nn.ModuleList(
      [HeadBlockV2(width, z_dim, hidden) if cross else HeadBlockV1(width, hidden)
       for _ in range(depth)])
    self.final_layer = FinalLayer(width, in_ch)

  def forward(self, x, t, z):
    tau = (t * 1000).long()
    h = self.input_proj(x)
    te = self.time_embed(tau).unsqueeze(1)
    c = self.cond_embed(z)
    for blk in self.res_blocks:
      h = blk(h, te, c, z)
    return self.final_layer(h, c + te)


def _bicubic_area(x, side, next_side):
  b, n, c = x.shape
  g = x.permute(0, 2, 1).reshape(b, c, side, side)
  g = F.interpolate(F.interpolate(g, (16, 16), mode='bicubic'), (next_side, next_side),
                    mode='area')
  return g.reshape(b, c, -1).permute(0, 2, 1)


def time_grid(n):
  grid = torch.cat([torch.linspace(1, 0.3, n // 2, dtype=torch.float64),
                    torch.linspace(0.25, 0, n // 2 + 1, dtype=torch.float64)])
  if n == 50:
    grid = torch.linspace(1, 0, n + 1, dtype=torch.float64)
  return grid


def euler_sampler(head, latents, z, num_steps, cfg_scale=1.0, guidance_high=1.0,
                  guidance_low=0.0, state_dtype=torch.float64):
  """The official Euler sampler: float64 state, guided steps duplicate the first half.
  `state_dtype=torch.float32` (precision studies only) keeps the state and the step sizes in
  float32, as the JAX port does."""
  dtype = latents.dtype
  grid = time_grid(num_steps)
  x = latents.to(state_dtype)
  for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
    guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
    inp = torch.cat([x[: x.shape[0] // 2]] * 2) if guided else x
    t_in = torch.ones(inp.shape[0], dtype=torch.float64) * t_cur
    d = head(inp.to(dtype), t_in.to(dtype), z.to(dtype)).to(state_dtype)
    if guided:
      dc, du = d.chunk(2)
      d = du + cfg_scale * (dc - du)
      d = torch.cat([d, d])
    x = x + (t_next - t_cur).to(state_dtype) * d
  return x


class FlowARRef(nn.Module):
  def __init__(self, width=768, encoder_depth=6, decoder_depth=6, heads=12, head_width=1024,
               head_depth=2, head_cross=False, scales=(1, 2, 4, 8, 16), token_dim=16,
               class_num=1000, mlp_ratio=4.0, **_):
    super().__init__()
    self.scales = list(scales)
    self.token_dim = token_dim
    self.class_num = class_num
    seq = sum(s * s for s in scales)
    hidden = int(width * mlp_ratio * 2 / 3.)
    self.encoder_pos_embed_learned = nn.Parameter(torch.randn(1, seq, width) * 0.02)
    self.decoder_pos_embed_learned = nn.Parameter(torch.randn(1, seq, width) * 0.02)
    self.diffusion_pos_embed_learned = nn.Parameter(torch.randn(1, seq, width) * 0.02)
    block = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])
    mask = torch.where(block[None, :] <= block[:, None], 0.0, -torch.inf)
    self.register_buffer('mask', mask[None, None].contiguous())
    self.class_emb = nn.Embedding(class_num + 1, width)
    self.z_proj = nn.Linear(token_dim, width)
    self.z_proj_ln = RMSNorm(width, True)
    self.encoder_blocks = nn.ModuleList(
      [TrunkBlock(width, heads, hidden) for _ in range(encoder_depth)])
    self.encoder_norm = RMSNorm(width, True)
    self.decoder_embed = nn.Linear(width, width)
    self.decoder_blocks = nn.ModuleList(
      [TrunkBlock(width, heads, hidden) for _ in range(decoder_depth)])
    self.decoder_norm = RMSNorm(width, True)
    self.flownet = FlowHead(token_dim, head_width, width, head_depth, head_cross,
                            int(head_width * mlp_ratio * 2 / 3.))

  def clear_cache(self):
    for blk in (*self.encoder_blocks, *self.decoder_blocks):
      blk.attn.clear_cache()

  def trunk_step(self, x, cond, start, end):
    """Encoder + decoder on the tokens of rows [start, end), appending to the KV caches."""
    h = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, start:end])
    for blk in self.encoder_blocks:
      h = blk(h, cond)
    h = self.encoder_norm(h)
    g = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, start:end]
    for blk in self.decoder_blocks:
      g = blk(g, cond)
    return self.decoder_norm(g) + self.diffusion_pos_embed_learned[:, start:end]

  @torch.no_grad()
  def sample_tokens(self, labels, flow_upper_steps=50, flow_lower_steps=15, guidance=0.9,
                    cfg=1.0, noise=None, steps=None, state_dtype=torch.float64):
    """Official sample_tokens; `noise[s]` replaces randn of scale s; `steps` (optional) gives
    the requested steps per scale instead of the DiSA formula."""
    batch = labels.shape[0]
    cond = self.class_emb(labels)
    if cfg != 1.0:
      cond = torch.cat([cond, self.class_emb(torch.full_like(labels, self.class_num))])
    x = cond.unsqueeze(1)
    self.clear_cache()
    last = len(self.scales) - 1
    start = 0
    for s, side in enumerate(self.scales):
      end = start + side * side
      z = self.trunk_step(x, cond, start, end)
      start = end
      cfg_s = (cfg - 1) * s / last + 1
      n = int((flow_upper_steps - flow_lower_steps) * (last - s) / last + flow_lower_steps)
      if steps is not None:
        n = steps[s]
      eps = noise[s] if noise is not None else torch.randn(z.shape[0], z.shape[1],
                                                            self.token_dim)
      out = euler_sampler(self.flownet, torch.as_tensor(eps, dtype=torch.float32), z, n,
                          cfg_scale=cfg_s, guidance_high=guidance,
                          state_dtype=state_dtype).float()
      sample = out[:batch]
      if s == last:
        break
      u = _bicubic_area(sample, side, self.scales[s + 1])
      if cfg != 1.0:
        u = u.repeat(2, 1, 1)
      x = self.z_proj(u)
    b, n, c = sample.shape
    m = self.scales[-1]
    return sample.reshape(b, m, m, c).permute(0, 3, 1, 2)
