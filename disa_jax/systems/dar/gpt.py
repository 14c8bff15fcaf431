"""D-AR's class-conditional GPT (LlamaGen blocks with a 1-D RoPE), with a static KV cache.

Matches autoregressive/models/gpt.py of showlab/D-AR @ 3fb0f2d (model_type c2i,
cls_token_num 1). Shapes: B rows (2B with CFG), D width, H = D / 64 heads, V = 16384,
L = 256 image tokens, positions 0..L (class token at 0, image token j at j + 1).

  h_0  = [cls_table[y] ; tok_table[ids]]                       (B, S, D)
  h   += Attn(RMSNorm h)   (wqkv fused, RoPE on q and k, causal)
  h   += SwiGLU(RMSNorm h) (hidden = round_up(8 D / 3, 256))
  logits = output(RMSNorm h) as float32                        (B, S, V)
Class row `num_classes` is the null class used for CFG.

`forward(tokens_emb, positions, cache)` runs S new positions against a cache of shape
(layers, 2, B, H, T_max, 64) (T_max = round_up(L + 1, 8) = 264), writing the new keys and
values at `positions[0]..` and attending to cached positions <= each query's position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.layers import (
  HEAD_DIM,
  RMSNorm,
  SwiGLU,
  apply_rope,
  attend,
  dense,
  rope_1d_table,
  swiglu_hidden,
)

# Official sizes (autoregressive/models/gpt.py GPT_L / GPT_XL).
GPT_VARIANTS = {
  'l': dict(dim=1024, n_layer=24, n_head=16),
  'xl': dict(dim=1280, n_layer=36, n_head=20),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  dim: int = 1024
  n_layer: int = 24
  n_head: int = 16
  vocab_size: int = 16384
  block_size: int = 256
  num_classes: int = 1000
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  ffn_hidden: int = 0          # 0: round_up(int(8 dim / 3), 256) as the official FeedForward
  dtype: str = 'float32'       # compute dtype (the official runs cast the GPT to bfloat16)

  def __post_init__(self):
    if self.dim != self.n_head * HEAD_DIM:
      raise UserError(f'GPT width {self.dim} != n_head {self.n_head} x {HEAD_DIM}')
    if self.dtype not in ('float32', 'bfloat16'):
      raise UserError(f'GPT dtype must be float32 or bfloat16, got {self.dtype!r}')

  @property
  def hidden(self) -> int:
    return self.ffn_hidden or swiglu_hidden(self.dim)

  @property
  def cache_len(self) -> int:
    n = self.block_size + 1
    return n if n % 8 == 0 else n + 8 - n % 8

  @classmethod
  def from_dict(cls, d: dict) -> GPTConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise UserError(f'unknown D-AR GPT config fields: {", ".join(unknown)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class Attention(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.n_head = cfg.n_head
    self.wqkv = dense(cfg.dim, 3 * cfg.dim, rngs=rngs, bias=False)
    self.wo = dense(cfg.dim, cfg.dim, rngs=rngs, bias=False)

  def __call__(self, x, rope, cache_kv, start, mask):
    """x (B, S, D); cache_kv (2, B, H, T, 64); start: first position (scalar, or (B,) per row);
    mask (S, T) or (B, 1, S, T)."""
    b, s, d = x.shape
    q, k, v = jnp.split(self.wqkv(x), 3, axis=-1)
    q, k, v = (a.reshape(b, s, self.n_head, HEAD_DIM).transpose(0, 2, 1, 3) for a in (q, k, v))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if jnp.ndim(start) == 0:
      keys = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv.dtype),
                                          (0, 0, start, 0))
      values = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv.dtype),
                                            (0, 0, start, 0))
    else:                                   # ragged: every row writes at its own position
      def write(cache, new):
        return jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (0, p, 0)))(
          cache, new.astype(cache.dtype), start)
      keys, values = write(cache_kv[0], k), write(cache_kv[1], v)
    out = attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
    return self.wo(out.transpose(0, 2, 1, 3).reshape(b, s, d)), jnp.stack([keys, values])


class Block(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.feed_forward = SwiGLU(cfg.dim, cfg.hidden, rngs=rngs)
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

  def __call__(self, x, rope, cache_kv, start, mask):
    a, cache_kv = self.attention(self.attention_norm(x), rope, cache_kv, start, mask)
    h = x + a
    return h + self.feed_forward(self.ffn_norm(h)), cache_kv


class GPT(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = jax.nn.initializers.normal(0.02)
    self.cls_embedding = nnx.Param(init(rngs.params(), (cfg.num_classes + 1, cfg.dim)))
    self.tok_embeddings = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.dim)))
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.output = dense(cfg.dim, cfg.vocab_size, rngs=rngs, bias=False)

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.cfg.dtype == 'bfloat16' else jnp.float32

  def empty_cache(self, rows: int):
    """Zero KV cache (layers, 2, rows, H, T_max, 64) in the compute dtype."""
    c = self.cfg
    return jnp.zeros((c.n_layer, 2, rows, c.n_head, c.cache_len, HEAD_DIM), self.compute_dtype)

  def embed(self, labels, ids=None):
    """[class embedding ; token embeddings] (B, 1 + P, D); ids (B, P) or None."""
    h = self.cls_embedding[...][labels][:, None]
    if ids is not None and ids.shape[1]:
      h = jnp.concatenate([h, self.tok_embeddings[...][ids]], axis=1)
    return h

  def embed_tokens(self, ids):
    return self.tok_embeddings[...][ids]

  def forward(self, h, start, cache):
    """h (B, S, D) embeddings at positions start..start+S-1 -> (float32 logits (B, S, V), cache).
    `start` may be traced (one compile for every decode position), and may be (B,): each row
    at its own positions (ragged speculative rounds, `speculative.py`)."""
    dtype = self.compute_dtype
    s = h.shape[1]
    table = rope_1d_table(cache.shape[-2], HEAD_DIM, self.cfg.rope_base)
    keys = jnp.arange(cache.shape[-2])
    if jnp.ndim(start) == 0:
      cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(table[0]), start, s)
      sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(table[1]), start, s)
      q_pos = start + jnp.arange(s)
      mask = keys[None, :] <= q_pos[:, None]
    else:
      q_pos = start[:, None] + jnp.arange(s)                      # (B, S)
      cos, sin = jnp.asarray(table[0])[q_pos][:, None], jnp.asarray(table[1])[q_pos][:, None]
      mask = keys[None, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, S, T)
    h = h.astype(dtype)
    new = []
    for i, layer in enumerate(self.layers):
      h, kv = layer(h, (cos, sin), cache[i], start, mask)
      new.append(kv)
    logits = self.output(self.norm(h)).astype(jnp.float32)
    return logits, jnp.stack(new)

  def __call__(self, labels, ids):
    """Full causal forward without a cache (teacher forcing): logits (B, 1 + P, V); row i
    predicts image token i."""
    h = self.embed(labels, ids)
    logits, _ = self.forward(h, 0, self.empty_cache(h.shape[0]))
    return logits


def cast_params(model: GPT, dtype) -> GPT:
  """The official bf16 runs cast the whole module (weights included): same here."""
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(lambda a: a.astype(dtype), state)
  nnx.update(model, state)
  return model


def param_count(model) -> int:
  return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))
