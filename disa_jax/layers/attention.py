"""Multi-head attention of FlowAR / xAR with 2-D RoPE, masks and an append-only KV cache.

Official: `Attention` in `FlowAR_DiSA/models/flowar.py` (trunk, with cache) and
`Attention` / `CrossAttention` in `FlowAR_DiSA/models/flowmodel.py` (flow head).

Self-attention, x (B, N, D), H heads of hd = D / H:
  q, k, v = split(qkv(x)) laid out [q | k | v], each [head 0 | head 1 | ...]
  q, k = rope(q), rope(k)                         (same table for every head; `rope.py`)
  out = proj( concat_h softmax(q k^T / sqrt(hd) + mask) v )
The trunk has a qkv bias, the flow head does not; `proj` always has a bias.
KV cache (inference across AR steps): the post-RoPE keys and the values of the new tokens are
appended to the cached ones and the new queries attend to all of them. The cache is a plain
(k, v) pair of arrays (B, H, M, hd); every AR step has its own static M, so each step is traced
once. Cross-attention: q = q_lin(x) (no bias), [k | v] = kv(c) (no bias), RoPE on q and k.
Softmax runs in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from disa_jax.layers.mlp import dense
from disa_jax.layers.rope import apply_rope


def split_heads(x, heads: int):
  """(B, N, H * hd) -> (B, H, N, hd)."""
  b, n, d = x.shape
  return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
  """(B, H, N, hd) -> (B, N, H * hd)."""
  b, h, n, hd = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


def dot_product_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(hd) + mask) v; q (B, H, N, hd), k/v (B, H, M, hd).

  mask: None, a boolean array broadcastable to (B, H, N, M) (True = attend), or an additive
  float array (0 / -inf, the official buffer format).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bhnd,bhmd->bhnm', q, k).astype(jnp.float32) * scale
  if mask is not None:
    if mask.dtype == jnp.bool_:
      logits = jnp.where(mask, logits, -jnp.inf)
    else:
      logits = logits + mask.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhnm,bhmd->bhnd', weights, v)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with RoPE; `__call__` without cache, `with_cache` appends."""

  def __init__(self, dim: int, heads: int, *, qkv_bias: bool, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f'width {dim} is not divisible by {heads} heads')
    self.heads = heads
    self.qkv = dense(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs)
    self.proj = dense(dim, dim, rngs=rngs)

  def _qkv(self, x, rope):
    b, n, d = x.shape
    hd = d // self.heads
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    return apply_rope(q, rope), apply_rope(k, rope), v

  def __call__(self, x, *, rope=None, mask=None):
    q, k, v = self._qkv(x, rope)
    return self.proj(merge_heads(dot_product_attention(q, k, v, mask)))

  def with_cache(self, x, cache=None, *, rope=None, mask=None):
    """(output, (k, v)) where k, v = cache + this call's post-RoPE keys / values."""
    q, k, v = self._qkv(x, rope)
    if cache is not None:
      k = jnp.concatenate([cache[0], k], axis=2)
      v = jnp.concatenate([cache[1], v], axis=2)
    return self.proj(merge_heads(dot_product_attention(q, k, v, mask))), (k, v)


class CrossAttention(nnx.Module):
  """Queries from x (width W), keys/values from c (width Dc), RoPE on q and k, no qkv bias."""

  def __init__(self, dim: int, context_dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.q = dense(dim, dim, use_bias=False, rngs=rngs)
    self.kv = dense(context_dim, 2 * dim, use_bias=False, rngs=rngs)
    self.proj = dense(dim, dim, rngs=rngs)

  def __call__(self, x, c, *, rope=None, mask=None):
    b, m, _ = c.shape
    d = x.shape[-1]
    q = apply_rope(split_heads(self.q(x), self.heads), rope)
    kv = self.kv(c).reshape(b, m, 2, self.heads, d // self.heads).transpose(2, 0, 3, 1, 4)
    k = apply_rope(kv[0], rope)
    return self.proj(merge_heads(dot_product_attention(q, k, kv[1], mask)))
