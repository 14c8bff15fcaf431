"""PyTorch reference of D-AR (tokenizer v1 + class-conditional GPT + generation loop), written
from the official semantics of showlab/D-AR @ 3fb0f2d (tokenizer/tokenizer_image/{vq_model,
diff_decoder,tokenizer_transformer,patching}.py, autoregressive/models/{gpt,generate}.py) for
parity tests and `python -m disa_jax.systems.dar.bench`. Not installed, not used at run time.

Module and parameter names equal the official ones, so `state_dict()` has the official keys
(including the training-only REPA projector and codebook-usage buffer). Every random draw is
injected: the decoder's noise (NCHW, as the official torch.randn) and one uniform per sampled
token (inverse-CDF categorical, replacing torch.multinomial). Images are NCHW in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------ tokenizer
def rope_2d(height: int, width: int, theta: float = 10000.0, axis_dim: int = 32):
  """flux EmbedND table (1, 1, N, 32, 2, 2): rotation matrices per pair, float64 -> float32."""
  omega = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
  rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                              torch.arange(width, dtype=torch.float64), indexing='ij')
  ang = torch.cat([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], dim=1)
  c, s = torch.cos(ang), torch.sin(ang)
  rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
  return rot.float()[None, None]


def rotate(x, rot):
  """x (B, H, N, 64) rotated by (1, 1, N, 32, 2, 2), as flux apply_rope."""
  xr = x.float().reshape(*x.shape[:-1], -1, 1, 2)
  out = rot[..., 0] * xr[..., 0] + rot[..., 1] * xr[..., 1]
  return out.reshape(*x.shape).type_as(x)


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.SiLU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim, head_dim=64):
    super().__init__()
    self.heads, self.head_dim = dim // head_dim, head_dim
    self.q = nn.Linear(dim, dim)
    self.k = nn.Linear(dim, dim)
    self.v = nn.Linear(dim, dim)
    self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
    self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x=None, q=None, k=None, v=None, attn_mask=None, causal=False, pe=None,
              q_pe=None):
    if x is not None:
      q = k = v = x
    b, n, c = q.shape

    def heads(t):
      return t.reshape(b, -1, self.heads, self.head_dim).permute(0, 2, 1, 3)

    q, k, v = heads(self.q(q)), heads(self.k(k)), heads(self.v(v))
    q, k = self.q_norm(q), self.k_norm(k)
    if pe is not None:
      q, k = rotate(q, pe), rotate(k, pe)
    if q_pe is not None:
      q = rotate(q, q_pe)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.attention = Attention(dim)
    self.mlp = Mlp(dim, 4 * dim)
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.gate1 = nn.Parameter(torch.zeros(dim))
    self.gate2 = nn.Parameter(torch.zeros(dim))

  def forward(self, x, attn_mask=None, pe=None, causal=False):
    x = x + self.attention(self.norm1(x), attn_mask=attn_mask, pe=pe, causal=causal) * self.gate1
    return x + self.mlp(self.norm2(x)) * self.gate2


class TimestepEmbedder(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dim = dim
    self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    half = self.dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (t * 1000)[:, None].float() * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class SiTBlock(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.attention = Attention(dim)
    self.cross_attn = Attention(dim)
    self.mlp = Mlp(dim, 4 * dim)
    self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
    self.time_embed = TimestepEmbedder(dim)
    self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, x, c, t, rope):
    tau = self.time_embed(t)[:, None]
    c = self.norm(self.cond_embed(c))
    r = self.cross_attn(q=self.norm(x), k=c, v=c, q_pe=rope)
    sa, ca, ga, sm, cm, gm = self.adaLN_modulation(tau + r).chunk(6, dim=-1)
    x = x + ga * self.attention(self.norm(x) * (1 + ca) + sa, pe=rope)
    return x + gm * self.mlp(self.norm(x) * (1 + cm) + sm)


class DiffusionCore(nn.Module):
  def __init__(self, dim, depth, patch, cond_dim):
    super().__init__()
    self.patch = patch
    self.cond_mlp = nn.Linear(cond_dim, dim)
    self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    self.conv_in = nn.Conv2d(3 * patch * patch, dim, 1)
    self.conv_out = nn.Conv2d(dim, 3 * patch * patch, 1)
    self.blocks = nn.ModuleList([SiTBlock(dim) for _ in range(depth)])
    self.repa_out = nn.Sequential(nn.Linear(dim, 2048), nn.SiLU(), nn.Linear(2048, 2048),
                                  nn.SiLU(), nn.Linear(2048, 768))   # training only

  def forward(self, x, t, cond):
    p = self.patch
    cond = self.norm(self.cond_mlp(cond))
    b, c, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    z = x.reshape(b, c, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, gh, gw)
    rope = rope_2d(gh, gw)
    z = self.conv_in(z).flatten(2).transpose(1, 2)
    for block in self.blocks:
      z = block(z, cond, t, rope)
    z = self.norm(z).transpose(1, 2).reshape(b, -1, gh, gw)
    z = self.conv_out(z)
    return z.reshape(b, c, p, p, gh, gw).permute(0, 1, 4, 2, 5, 3).reshape(b, c, hh, ww)


class DiffusionDecoder(nn.Module):
  def __init__(self, dim, depth, patch, cond_dim):
    super().__init__()
    self.net = DiffusionCore(dim, depth, patch, cond_dim)


class Quantizer(nn.Module):
  def __init__(self, n, dim):
    super().__init__()
    self.embedding = nn.Embedding(n, dim)
    self.register_buffer('codebook_used', torch.zeros(65536))

  def indices(self, z):
    """z (B, N, d) -> ids (B, N): argmin |z^|^2 + |e^|^2 - 2 z^ e^ (both l2-normalised)."""
    zf = F.normalize(z.reshape(-1, z.shape[-1]), p=2, dim=-1)
    e = F.normalize(self.embedding.weight, p=2, dim=-1)
    d = (torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
         - 2 * torch.einsum('bd,dn->bn', zf, e.t()))
    return torch.argmin(d, dim=1).reshape(z.shape[0], -1)

  def entry(self, ids):
    return F.normalize(self.embedding.weight, p=2, dim=-1)[ids]


class Tokenizer(nn.Module):
  """VQModel of tokenizer v1 with configurable sizes (defaults = the released model)."""

  def __init__(self, width=768, patch=16, enc_layers=8, dec_layers=8, queries=256, groups=8,
               steps=8, vq_dim=8, codebook=16384, flow_width=768, flow_depth=12, flow_patch=8,
               table=1024, data_std=0.6, time_shift=2):
    super().__init__()
    self.queries, self.groups, self.steps = queries, groups, steps
    self.per_group = queries // groups
    self.data_std, self.time_shift = data_std, time_shift
    self.encoder_layers = nn.ModuleList([TransformerBlock(width) for _ in range(enc_layers)])
    self.decoder_layers = nn.ModuleList([TransformerBlock(width) for _ in range(dec_layers)])
    self.encoder_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False, bias=False)
    self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False, bias=False)
    self.patchify = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
    self.quant_in_conv = nn.Conv2d(width, vq_dim, 1, bias=False)
    self.quant_out_conv = nn.Conv2d(vq_dim, width, 1, bias=False)
    self.quantize = Quantizer(codebook, vq_dim)
    self.query_embedding = nn.Embedding(table, 8)
    self.query_linear = nn.Linear(8, width)
    self.decoder_embedding = nn.Embedding(table, width)
    self.diff_decoder = DiffusionDecoder(flow_width, flow_depth, flow_patch, width)

  def encode(self, x):
    """x (B, 3, H, W) -> ids (B, N)."""
    p = self.patchify(x)
    b, _, gh, gw = p.shape
    p = self.encoder_norm(p.flatten(2).transpose(1, 2))
    n_p, n_q = gh * gw, self.queries
    rope = rope_2d(gh, gw)
    eye = torch.eye(2).to(rope)[None, None, None, None].repeat(1, 1, n_q, rope.shape[3], 1, 1)
    rope = torch.cat([rope, eye], dim=2)
    q = self.query_linear(self.query_embedding.weight[:n_q])[None].expand(b, -1, -1)
    tokens = torch.cat([p, q], dim=1)
    n = n_p + n_q
    mask = torch.tril(torch.ones(1, 1, n, n, dtype=torch.bool))
    mask[:, :, :, :n_p] = True
    for layer in self.encoder_layers:
      tokens = layer(tokens, attn_mask=mask, pe=rope)
    tokens = self.encoder_norm(tokens[:, -n_q:])
    z = self.quant_in_conv(tokens.transpose(1, 2)[:, :, None])   # (B, vq, 1, N)
    return self.quantize.indices(z[:, :, 0].transpose(1, 2))

  def conditions(self, ids):
    q = self.quantize.entry(ids)                                    # (B, N, vq)
    h = self.quant_out_conv(q.transpose(1, 2)[:, :, None])[:, :, 0].transpose(1, 2)
    h = h + self.decoder_embedding.weight[:self.queries]
    for layer in self.decoder_layers:
      h = layer(h, causal=True)
    return self.norm(h)

  def shift(self, t):
    return t / (t + self.time_shift * (1 - t))

  def velocity(self, x, t, cond_group):
    return self.diff_decoder.net(x, t, cond_group)

  def decode_code(self, ids, noise, clip_steps=None, num_steps=None):
    """Official decode_code + decode_into_pixels + sample(method adams2), noise injected."""
    cond = self.conditions(ids)
    s = num_steps or self.steps
    u = [i / s for i in range(s)]
    u = u[:clip_steps] if clip_steps is not None else u
    conds = []
    for t in u:
      g = math.floor(t * self.groups + 0.5) / self.groups
      idx = min(self.queries - self.per_group, int(g * self.queries))
      conds.append(cond[:, idx:idx + self.per_group])
    sched = self.shift(torch.tensor(u + [1.0], dtype=torch.float32))
    h = sched[1:] - sched[:-1]
    x, v_prev = noise, None
    for i, cur in enumerate(sched[:-1]):
      v = self.velocity(x, cur.repeat(x.shape[0]), conds[i])
      x = x + h[i] * (v if v_prev is None else 1.5 * v - 0.5 * v_prev)
      v_prev = v
    return x * (1.0 / self.data_std)


# ------------------------------------------------------------------------------------------ GPT
class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) \
      * self.weight


class FeedForward(nn.Module):
  def __init__(self, dim):
    super().__init__()
    hidden = int(2 * 4 * dim / 3)
    hidden = hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256
    self.w1 = nn.Linear(dim, hidden, bias=False)
    self.w3 = nn.Linear(dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_1d(length, head_dim=64, base=10000):
  freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
  ang = torch.outer(torch.arange(length), freqs)
  cis = torch.polar(torch.ones_like(ang), ang)
  return torch.stack([cis.real, cis.imag], dim=-1)        # (L, 32, 2)


def rotate_1d(x, table):
  """x (B, S, H, 64), table (S, 32, 2)."""
  xs = x.float().reshape(*x.shape[:-1], -1, 2)
  t = table.view(1, xs.shape[1], 1, xs.shape[3], 2)
  out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                     xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
  return out.flatten(3).type_as(x)


class GPTAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.dim, self.heads = dim, heads
    self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
    self.wo = nn.Linear(dim, dim, bias=False)
    self.cache = None   # (k, v), each (B, H, T_max, 64)

  def forward(self, x, table, pos, mask):
    b, s, _ = x.shape
    q, k, v = self.wqkv(x).split([self.dim] * 3, dim=-1)
    q, k, v = (t.view(b, s, self.heads, 64) for t in (q, k, v))
    q, k = rotate_1d(q, table), rotate_1d(k, table)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if self.cache is not None:
      self.cache[0][:, :, pos] = k
      self.cache[1][:, :, pos] = v
      k, v = self.cache
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return self.wo(out.transpose(1, 2).contiguous().view(b, s, self.dim))


class GPTBlock(nn.Module):
  def __init__(self, dim, heads, eps):
    super().__init__()
    self.attention = GPTAttention(dim, heads)
    self.feed_forward = FeedForward(dim)
    self.attention_norm = RMSNorm(dim, eps)
    self.ffn_norm = RMSNorm(dim, eps)

  def forward(self, x, table, pos, mask):
    h = x + self.attention(self.attention_norm(x), table, pos, mask)
    return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, dim):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, dim)


class GPT(nn.Module):
  """Transformer (c2i, cls_token_num 1) of autoregressive/models/gpt.py."""

  def __init__(self, dim=1024, n_layer=24, n_head=16, vocab=16384, block_size=256,
               num_classes=1000, eps=1e-5):
    super().__init__()
    self.num_classes, self.block_size = num_classes, block_size
    self.cls_embedding = LabelEmbedder(num_classes, dim)
    self.tok_embeddings = nn.Embedding(vocab, dim)
    self.layers = nn.ModuleList([GPTBlock(dim, n_head, eps) for _ in range(n_layer)])
    self.norm = RMSNorm(dim, eps)
    self.output = nn.Linear(dim, vocab, bias=False)
    self.table = rope_1d(block_size + 1, dim // n_head)
    self.causal = None

  def setup_caches(self, rows, dtype=torch.float32):
    t = self.block_size + 1
    t = t if t % 8 == 0 else t + 8 - t % 8
    for layer in self.layers:
      a = layer.attention
      a.cache = (torch.zeros(rows, a.heads, t, 64, dtype=dtype),
                 torch.zeros(rows, a.heads, t, 64, dtype=dtype))
    self.causal = torch.tril(torch.ones(t, t, dtype=torch.bool))

  def clear_caches(self):
    for layer in self.layers:
      layer.attention.cache = None
    self.causal = None

  def forward(self, h, pos):
    """h (B, S, D) at positions `pos` (S,) -> float32 logits (B, S, V)."""
    mask = None if self.causal is None else self.causal[None, None, pos]
    table = self.table[pos]
    for layer in self.layers:
      h = layer(h, table, pos, mask)
    return self.output(self.norm(h)).float()

  def full_logits(self, labels, ids):
    """Teacher-forced logits without a cache: (B, 1 + P, V)."""
    h = torch.cat([self.cls_embedding.embedding_table(labels)[:, None],
                   self.tok_embeddings(ids)], dim=1)
    return self.forward(h, torch.arange(h.shape[1]))


def cfg_scales(cfg, length):
  parts = [float(p) for p in str(cfg).split(',')]
  a, b = parts[0], parts[-1]
  if max(a, b) > 1.0 and a == 1.0:
    a += 1e-3
  return torch.linspace(a, b, length), a > 1.0


def top_k_top_p(logits, top_k=0, top_p=1.0):
  if top_k > 0:
    k = min(top_k, logits.size(-1))
    logits[logits < torch.topk(logits, k)[0][..., -1, None]] = -float('inf')
  if top_p < 1.0:
    srt, idx = torch.sort(logits, descending=True, stable=True)
    remove = torch.cumsum(F.softmax(srt, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    logits[remove.scatter(1, idx, remove)] = -float('inf')
  return logits


def draw(logits, uniforms, temperature=1.0, top_k=0, top_p=1.0):
  """generate.sample with multinomial replaced by the inverse CDF at `uniforms` (B,)."""
  logits = logits / max(temperature, 1e-5)
  if top_k > 0 or top_p < 1.0:
    logits = top_k_top_p(logits, top_k, top_p)
  probs = F.softmax(logits, dim=-1)
  cdf = torch.cumsum(probs, dim=-1)
  ids = (cdf < uniforms[:, None].float() * cdf[:, -1:]).sum(-1)
  return ids.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model: GPT, labels, uniforms, cfg='1.2,8.0', temperature=1.0, top_k=0, top_p=1.0,
             prefix=None):
  """generate.py's loop (prefill + one cached step per token) with injected uniforms (B, L);
  `prefix` (B, P) ids are prefilled with the class token (layout control)."""
  b, L = labels.shape[0], model.block_size
  scales, on = cfg_scales(cfg, L)
  rows = 2 * b if on else b
  model.setup_caches(rows)
  lab = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if on else labels
  h = model.cls_embedding.embedding_table(lab)[:, None]
  p = 0 if prefix is None else prefix.shape[1]
  if p:
    pre = torch.cat([prefix, prefix]) if on else prefix
    h = torch.cat([h, model.tok_embeddings(pre)], dim=1)
  seq = torch.zeros(b, L, dtype=torch.long)
  if p:
    seq[:, :p] = prefix

  def guided(logits, j):
    logits = logits[:, -1]
    if on:
      c, u = logits.split(b)
      logits = u + (c - u) * scales[j].item()
    return logits

  logits = model(h, torch.arange(p + 1))
  ids = draw(guided(logits, p), uniforms[:, p], temperature, top_k, top_p)
  seq[:, p] = ids
  for j in range(p + 1, L):
    x = torch.cat([ids, ids]) if on else ids
    logits = model(model.tok_embeddings(x)[:, None], torch.tensor([j]))
    ids = draw(guided(logits, j), uniforms[:, j], temperature, top_k, top_p)
    seq[:, j] = ids
  model.clear_caches()
  return seq


# ------------------------------------------------------------------------------------ test aids
@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
  """Non-zero random weights everywhere (the official init zeroes gates, adaLN and conv_out):
  matrices ~ N(0, scale^2 / fan_in), vectors ~ N(0, 0.1^2) (+1 for norm weights), gates
  ~ N(0.5, 0.2^2), embeddings ~ N(0, 1)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    r = torch.randn(p.shape, generator=g)
    if p.ndim >= 2 and 'embedding' not in name:
      fan_in = p[0].numel()
      p.copy_(r * scale / math.sqrt(fan_in))
    elif p.ndim >= 2:
      p.copy_(r)
    elif name.endswith('gate1') or name.endswith('gate2'):
      p.copy_(0.5 + 0.2 * r)
    elif 'norm' in name and name.endswith('weight'):
      p.copy_(1.0 + 0.1 * r)
    else:
      p.copy_(0.1 * r)
  return module
