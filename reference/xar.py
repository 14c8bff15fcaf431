"""PyTorch reference of the official xAR (network with KV cache, Euler-Maruyama cell sampler).

Written from the official semantics of Qinyu-Allen-Zhao/DiSA `xAR_DiSA/models/{xar.py,
sampler.py, rope.py}` (= OliverRensu/xAR @ 121e9c9 apart from DiSA's per-cell steps; spec
`flowar_xar.md` §2, §5, §6). Module and parameter names reproduce the official state-dict keys
(incl. the `mask`, `rope.freqs`, `rope.freqs_cos`, `rope.freqs_sin` buffers), so its state dict
has the official checkpoint format. The attention layers keep the official stateful cache
(cleared per image batch, extended by the first pass of every cell, read by later passes).
Differences that do not change results: no CUDA / autocast / flash-attn, no training loop, and
`sample_tokens(..., noise=)` replaces every random draw (per cell: the fp32 initial noise
(B, 64, 16) and the float64 noise (B, 64, 16) of each stochastic step, in the official order).
The sampler state is float64 as in the official code (`state_dtype` to measure float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reference.flowar import GatedMLP, RMSNorm, TimestepEmbedder


def cell_major_order(grid=16, cell=8):
  """(L,) long: raster index of each cell-major token."""
  per_side = grid // cell
  p = torch.arange(grid * grid)
  c, inner = p // (cell * cell), p % (cell * cell)
  rows = cell * (c // per_side) + inner // cell
  cols = cell * (c % per_side) + inner % cell
  return rows * grid + cols


class CellRope(nn.Module):
  """VisionRotaryEmbeddingFast on the 16x16 integer grid, rows permuted to cell-major order."""

  def __init__(self, half_head_dim, grid=16, cell=8):
    super().__init__()
    dim = half_head_dim
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid).float()
    f = torch.einsum('i,f->if', t, freqs).repeat_interleave(2, dim=-1)
    table = torch.cat([f[:, None, :].expand(grid, grid, -1),
                       f[None, :, :].expand(grid, grid, -1)], dim=-1).reshape(grid * grid, -1)
    table = table[cell_major_order(grid, cell)]
    self.register_buffer('freqs', freqs)
    self.register_buffer('freqs_cos', table.cos())
    self.register_buffer('freqs_sin', table.sin())

  def forward(self, x, end):
    """x (B, H, N, hd) at the N positions ending at `end`."""
    n = x.shape[2]
    cos, sin = self.freqs_cos[end - n:end], self.freqs_sin[end - n:end]
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * cos + rot * sin


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.hd = heads, dim // heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)
    self.rope = CellRope(self.hd // 2)
    self.k = self.v = None

  def clear_cache(self):
    self.k = self.v = None

  def forward(self, x, end, mask=None, cache='none'):
    """cache: 'none' (no cache), 'update' (keys = cache + x; cache <- all but the last 64),
    'read' (keys = cache + x; cache unchanged)."""
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.rope(q, end), self.rope(k, end)
    if cache != 'none' and self.k is not None:
      k = torch.cat([self.k, k], dim=2)
      v = torch.cat([self.v, v], dim=2)
    if cache == 'update':
      self.k, self.v = k[:, :, :-64], v[:, :, :-64]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = Attention(dim, heads)
    self.mlp = GatedMLP(dim, hidden)
    self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
    self.dim = dim

  def forward(self, x, c, end, mask=None, cache='none'):
    """c: (B, N, D) per-token condition (each cell's condition repeated over its tokens)."""
    g1, g2, a1, a2, b1, b2 = self.ada_lin(c).chunk(6, dim=-1)
    x = x + self.attn(self.norm1(x) * (1 + a1) + b1, end, mask, cache) * g1
    return x + self.mlp(self.norm2(x) * (1 + a2) + b2) * g2


class XARRef(nn.Module):
  """The official xAR network; `sample_tokens` = DiSA's per-cell Euler-Maruyama loop."""

  def __init__(self, width=768, encoder_depth=8, decoder_depth=8, heads=12, token_dim=16,
               class_num=1000, mlp_ratio=4.0, grid=16, cell=8):
    super().__init__()
    d, L = width, grid * grid
    self.width, self.token_dim, self.class_num = width, token_dim, class_num
    self.grid, self.cell, self.n = grid, cell, cell * cell
    self.cells = (grid // cell) ** 2
    hidden = int(d * mlp_ratio * 2 / 3.)
    self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, d))
    self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, d))
    cell_id = torch.arange(L) // self.n
    mask = torch.where(cell_id[None, :] <= cell_id[:, None], 0.0, float('-inf'))
    self.register_buffer('mask', mask[None, None])
    self.class_emb = nn.Embedding(class_num + 1, d)
    self.time_embed = TimestepEmbedder(d)
    self.z_proj = nn.Linear(token_dim, d)
    self.z_proj_ln = RMSNorm(d, True)
    self.encoder_blocks = nn.ModuleList([Block(d, heads, hidden) for _ in range(encoder_depth)])
    self.encoder_norm = RMSNorm(d, True)
    self.decoder_embed = nn.Linear(d, d)
    self.decoder_blocks = nn.ModuleList([Block(d, heads, hidden) for _ in range(decoder_depth)])
    self.decoder_norm = RMSNorm(d, True)
    self.pred = nn.Linear(d, token_dim)

  def clear_cache(self):
    for blk in [*self.encoder_blocks, *self.decoder_blocks]:
      blk.attn.clear_cache()

  def net(self, x, labels, t_cells, end, mask=None, cache='none'):
    """Velocity of the N tokens of x (R, N, 16) ending at position `end`; t_cells (R, C) float32
    times of the C = N / 64 cells (tau = trunc(t * 1000))."""
    r, n, _ = x.shape
    tau = (t_cells.float() * 1000).long()
    c = self.class_emb(labels)[:, None] + torch.stack(
      [self.time_embed(tau[:, k]) for k in range(tau.shape[1])], dim=1)
    c = c.repeat_interleave(self.n, dim=1)
    h = self.z_proj_ln(self.z_proj(x) + self.encoder_pos_embed_learned[:, end - n:end])
    for blk in self.encoder_blocks:
      h = blk(h, c, end, mask, cache)
    h = self.encoder_norm(h)
    g = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, end - n:end]
    for blk in self.decoder_blocks:
      g = blk(g, c, end, mask, cache)
    return self.pred(self.decoder_norm(g))

  def forward_full(self, x, labels, t_cells):
    """All cells at once with the cell-causal mask (training form)."""
    return self.net(x, labels, t_cells, x.shape[1], self.mask)

  def cell_velocity(self, x, labels, t, s, first, ctx=None):
    """The sampler's network call for cell s: x (R, 64, 16), t (R,) float32. First pass:
    [ctx (t = 0) ; x] with the mask rows of both cells, cache updated; later: x against the
    cache."""
    end = (s + 1) * self.n
    if not first:
      return self.net(x, labels, t[:, None], end, None, 'read')
    if ctx is None:
      return self.net(x, labels, t[:, None], end, self.mask[:, :, end - self.n:end, :end],
                      'update')
    tc = torch.stack([torch.zeros_like(t), t], dim=1)
    v = self.net(torch.cat([ctx, x], dim=1), labels, tc, end,
                 self.mask[:, :, end - 2 * self.n:end, :end], 'update')
    return v[:, -self.n:]

  @torch.no_grad()
  def sample_tokens(self, labels, cfg, steps, noise, state_dtype=torch.float64):
    """Cell-major tokens (B, 256, 16) float32. steps: evaluations per cell; noise: per cell a
    pair (initial (B, 64, 16), steps (n_s - 1, B, 64, 16))."""
    self.clear_cache()
    b = labels.shape[0]
    y = torch.cat([labels, torch.full_like(labels, self.class_num)])
    samples, ctx = [], None
    for s in range(self.cells):
      cfg_s = (cfg - 1) * s / (self.cells - 1) + 1
      initial, step_noise = noise[s]
      x = torch.as_tensor(initial).float().to(state_dtype)
      n = steps[s]
      grid = torch.cat([torch.linspace(1.0, 0.04, n, dtype=torch.float64),
                        torch.tensor([0.0], dtype=torch.float64)])
      for i in range(n):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        xin = torch.cat([x, x]).float()
        t_in = torch.full((2 * b,), float(t_cur), dtype=torch.float64).float()
        v = self.cell_velocity(xin, y, t_in, s, i == 0,
                               None if ctx is None else torch.cat([ctx, ctx])).to(state_dtype)
        xx = torch.cat([x, x])
        score = ((t_cur - 1) * v - xx) / t_cur
        d = v - 0.5 * (2 * t_cur) * score
        d_c, d_u = d.chunk(2)
        d = d_u + cfg_s * (d_c - d_u) if cfg_s > 1 else d_c
        if i < n - 1:
          eps = torch.as_tensor(step_noise[i]).to(torch.float64)
          x = x + d * dt + torch.sqrt(2 * t_cur) * torch.sqrt(torch.abs(dt)) * eps
        else:
          x = x + dt * d
      ctx = x.float()
      samples.append(ctx)
    self.clear_cache()
    return torch.cat(samples, dim=1)
