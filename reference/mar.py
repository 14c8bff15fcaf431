"""A PyTorch reference of MAR, its diffusion head and sampler, written from the spec (needs
`pip install disa_jax[torch]`).

Written for the parity tests from `shared/spec/mar_disa.md` (official semantics of LTH14/mar
and Qinyu-Allen-Zhao/DiSA): same module names as the official state dict, the official
masked-token *dropping* in the encoder, the official `sample_tokens` bookkeeping, and the
IDDPM `p_sample_loop` with learned-range variance. Randomness (orders, noise) is injected so
the JAX sampler can be compared token by token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TimestepEmbedder(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

  def forward(self, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
  def __init__(self, w):
    super().__init__()
    self.in_ln = nn.LayerNorm(w, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

  def forward(self, x, y):
    shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
    return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
  def __init__(self, w, out):
    super().__init__()
    self.norm_final = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(w, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))

  def forward(self, x, y):
    shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
    return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
  def __init__(self, ch, w, zc, depth):
    super().__init__()
    self.ch = ch
    self.time_embed = TimestepEmbedder(w)
    self.cond_embed = nn.Linear(zc, w)
    self.input_proj = nn.Linear(ch, w)
    self.res_blocks = nn.ModuleList([ResBlock(w) for _ in range(depth)])
    self.final_layer = FinalLayer(w, 2 * ch)

  def forward(self, x, t, c):
    x = self.input_proj(x)
    y = self.time_embed(t) + self.cond_embed(c)
    for blk in self.res_blocks:
      x = blk(x, y)
    return self.final_layer(x, y)

  def forward_with_cfg(self, x, t, c, cfg_scale):
    half = x[: len(x) // 2]
    out = self.forward(torch.cat([half, half]), t, c)
    eps, rest = out[:, : self.ch], out[:, self.ch :]
    ce, ue = torch.split(eps, len(eps) // 2)
    g = ue + cfg_scale * (ce - ue)
    return torch.cat([torch.cat([g, g]), rest], dim=1)


class DiffLoss(nn.Module):
  def __init__(self, ch, zc, depth, w):
    super().__init__()
    self.net = SimpleMLPAdaLN(ch, w, zc, depth)


class TorchMAR(nn.Module):
  """Reference MAR; `cfg` is a `disa_jax.MARConfig` (only its numbers are read)."""

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    d, dd, nb, seq = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.buffer_size, cfg.seq_len
    self.nb, self.seq, self.ch = nb, seq, cfg.token_embed_dim
    self.fake_latent = nn.Parameter(torch.zeros(1, d))
    self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq + nb, d))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
    self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq + nb, dd))
    self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dd))
    self.class_emb = nn.Embedding(cfg.class_num, d)
    self.z_proj = nn.Linear(self.ch, d)
    self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
    self.encoder_blocks = nn.ModuleList(
      [Block(d, cfg.encoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.encoder_depth)])
    self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
    self.decoder_embed = nn.Linear(d, dd)
    self.decoder_blocks = nn.ModuleList(
      [Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
    self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
    self.diffloss = DiffLoss(self.ch, dd, cfg.diffloss_d, cfg.diffloss_w)

  def forward_mae_encoder(self, x, mask, class_embedding):
    x = self.z_proj(x)
    b, _, d = x.shape
    x = torch.cat([torch.zeros(b, self.nb, d), x], dim=1)
    mwb = torch.cat([torch.zeros(b, self.nb), mask], dim=1)
    x[:, : self.nb] = class_embedding.unsqueeze(1)
    x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
    x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(b, -1, d)  # drop masked tokens
    for blk in self.encoder_blocks:
      x = blk(x)
    return self.encoder_norm(x)

  def forward_mae_decoder(self, x, mask):
    x = self.decoder_embed(x)
    b = x.shape[0]
    mwb = torch.cat([torch.zeros(b, self.nb), mask], dim=1)
    pad = self.mask_token.repeat(b, mwb.shape[1], 1).clone()
    pad[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
    x = pad + self.decoder_pos_embed_learned
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_norm(x)[:, self.nb :] + self.diffusion_pos_embed_learned


# ------------------------------------------------------------------------------------------
def space_timesteps(n):
  stride = 1 if n <= 1 else 999 / (n - 1)
  cur, out = 0.0, []
  for _ in range(n):
    out.append(round(cur))
    cur += stride
  return set(out)


class SpacedDiffusionRef:
  """IDDPM `SpacedDiffusion` (cosine, learned range, eps) with DiSA's optional clamp."""

  def __init__(self, n, clip=None):
    def ab(u):
      return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    base = np.array([min(1 - ab((i + 1) / 1000) / ab(i / 1000), 0.999) for i in range(1000)])
    acp = np.cumprod(1 - base)
    kept = space_timesteps(n)
    if clip is not None:
      kept = {min(t, clip) for t in kept}
    last, betas, self.timestep_map = 1.0, [], []
    for i in range(1000):
      if i in kept:
        betas.append(1 - acp[i] / last)
        last = acp[i]
        self.timestep_map.append(i)
    b = np.array(betas, np.float64)
    ac = np.cumprod(1 - b)
    acp_prev = np.append(1.0, ac[:-1])
    pv = b * (1 - acp_prev) / (1 - ac)
    self.n = len(b)
    self.log_betas = np.log(b)
    self.post_logvar = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(pv)
    self.sqrt_recip = np.sqrt(1 / ac)
    self.sqrt_recipm1 = np.sqrt(1 / ac - 1)
    self.c1 = b * np.sqrt(acp_prev) / (1 - ac)
    self.c2 = (1 - acp_prev) * np.sqrt(1 - b) / (1 - ac)

  def p_sample_loop(self, fn, x, noise_iter, temperature=1.0, **kw):
    ch = x.shape[1]
    for k in reversed(range(self.n)):
      t = torch.full((x.shape[0],), self.timestep_map[k], dtype=torch.long)
      out = fn(x, t, **kw)
      eps, v = out[:, :ch], out[:, ch:]
      # Coefficients gathered from the float64 tables, then float32 (as the official code).
      log_beta, post_logvar, sqrt_recip, sqrt_recipm1, c1, c2 = (
        torch.tensor(a[k], dtype=torch.float32) for a in (
          self.log_betas, self.post_logvar, self.sqrt_recip, self.sqrt_recipm1, self.c1,
          self.c2))
      frac = (v + 1) / 2
      logvar = frac * log_beta + (1 - frac) * post_logvar
      x0 = sqrt_recip * x - sqrt_recipm1 * eps
      mean = c1 * x0 + c2 * x
      n = next(noise_iter)
      x = mean + (1.0 if k != 0 else 0.0) * torch.exp(0.5 * logvar) * n * temperature
    return x


def _default_noise(step, n, num_steps, ch, cfg_on):
  """What the official code draws: x_T for n rows (duplicated under CFG), then one
  randn_like(x) per step for all rows."""
  del step
  rows = 2 * n if cfg_on else n
  return torch.randn(n, ch), (torch.randn(rows, ch) for _ in range(num_steps))


@torch.no_grad()
def sample_tokens(model, bsz, *, num_iter, cfg, cfg_schedule, labels, temperature, steps,
                  clip, orders=None, noise_source=None, timings=None):
  """Official `sample_tokens` (+ DiSA per-step `steps`), optionally with injected randomness.

  orders [B, L] (default: numpy shuffles as the official code); noise_source(step, n,
  num_steps) -> (x_T [n, C], iterator of [2n or n, C]) (default: torch.randn as the official
  code). `timings`, a dict, accumulates 'backbone' and 'head' seconds.
  """
  import time

  seq, ch = model.seq, model.ch
  mask = torch.ones(bsz, seq)
  tokens = torch.zeros(bsz, seq, ch)
  if orders is None:
    orders = np.stack([np.random.permutation(seq) for _ in range(bsz)])
  orders = torch.as_tensor(np.asarray(orders), dtype=torch.long)
  for step in range(num_iter):
    t0 = time.perf_counter()
    cur = tokens.clone()
    ce = model.class_emb(torch.as_tensor(labels)) if labels is not None else \
      model.fake_latent.repeat(bsz, 1)
    if cfg != 1.0:
      tokens = torch.cat([tokens, tokens])
      ce = torch.cat([ce, model.fake_latent.repeat(bsz, 1)])
      mask = torch.cat([mask, mask])
    z = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, ce), mask)
    mask_len = np.floor(seq * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
    mask_len = max(1.0, min(float(mask[0].sum()) - 1, mask_len))
    mask_next = torch.zeros(bsz, seq)
    mask_next.scatter_(1, orders[:, : int(mask_len)], 1.0)
    if step >= num_iter - 1:
      to_pred = mask[:bsz].bool()
    else:
      to_pred = torch.logical_xor(mask[:bsz].bool(), mask_next.bool())
    mask = mask_next
    if cfg != 1.0:
      to_pred = torch.cat([to_pred, to_pred])
    zs = z[to_pred.nonzero(as_tuple=True)]
    t1 = time.perf_counter()
    cfg_iter = 1 + (cfg - 1) * (seq - mask_len) / seq if cfg_schedule == 'linear' else cfg
    diff = SpacedDiffusionRef(steps[step], clip)
    n = zs.shape[0] // (2 if cfg != 1.0 else 1)
    if noise_source is None:
      x_t, it = _default_noise(step, n, diff.n, ch, cfg != 1.0)
    else:
      x_t, it = noise_source(step, n, diff.n)
    x_t = torch.as_tensor(x_t, dtype=torch.float32)
    it = (torch.as_tensor(e, dtype=torch.float32) for e in it)
    if cfg != 1.0:
      x = torch.cat([x_t, x_t])
      out = diff.p_sample_loop(model.diffloss.net.forward_with_cfg, x, it, temperature, c=zs,
                               cfg_scale=cfg_iter)
      out, _ = out.chunk(2)
      to_pred, _ = to_pred.chunk(2)
    else:
      out = diff.p_sample_loop(model.diffloss.net.forward, x_t, it, temperature, c=zs)
    cur[to_pred.nonzero(as_tuple=True)] = out
    tokens = cur.clone()
    if timings is not None:
      t2 = time.perf_counter()
      timings['backbone'] = timings.get('backbone', 0.0) + t1 - t0
      timings['head'] = timings.get('head', 0.0) + t2 - t1
  return tokens


def randomize_(module: nn.Module, seed: int = 0, scale: float = 0.05):
  """Non-zero random values in every parameter (the official init zeroes adaLN/final layers,
  which would make a parity test vacuous); LayerNorm weights stay near 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=g) * scale
      if 'norm' in name or '_ln' in name:
        p.copy_(1.0 + r if name.endswith('weight') else r)
      else:
        p.copy_(r)
  return module
