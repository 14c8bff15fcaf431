"""Pre-norm ViT block with timm 0.9.12 `vision_transformer.Block` semantics (MAR's backbone).

x <- x + proj(attn(LN1(x)));  x <- x + fc2(GELU_erf(fc1(LN2(x))))
Fused qkv Linear with bias, output layout (3, heads, head_dim); scale 1/sqrt(head_dim); no
q/k-norm, LayerScale or drop-path. State-tree names match the official state dict
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`).

Two extensions used by the fast sampler, both numerically equivalent to the plain block:
- `key_mask` [B, Lk] (True = attend) excludes padded positions as attention keys, so a
  bucketed (padded) sequence gives the outputs of the unpadded one at its valid positions;
- `query_index` [B, n] computes outputs only at those positions (keys/values still use the
  whole sequence): the last decoder block only needs the tokens predicted this AR step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from disa_jax.layers.basic import dropout, layer_norm, linear, split_key


def default_attention_splits() -> int:
  """Independent head groups per attention call: the CPU core count on CPU, else 1.

  XLA:CPU runs a batched matmul on one thread but runs independent ops concurrently, so on
  CPU the heads are split into one group per core (~1.2x faster blocks on 2 cores).
  """
  if jax.default_backend() == 'cpu':
    return max(1, min(os.cpu_count() or 1, 8))
  return 1


def dot_product_attention(q, k, v, key_mask=None, *, splits=1, dropout_rate=0.0,
                          dropout_key=None):
  """softmax(q k^T / sqrt(d)) v.  q [B, Lq, H, d]; k, v [B, Lk, H, d] -> [B, Lq, H, d].

  Scores and softmax are float32 whatever the input dtype. With `splits` > 1 the heads are
  processed in that many independent groups (same result; see `default_attention_splits`).
  """
  h = q.shape[2]
  splits = max(1, min(splits, h))
  if splits == 1:
    return _attend(q, k, v, key_mask, dropout_rate, dropout_key)
  bounds = [round(i * h / splits) for i in range(splits + 1)]
  keys = split_key(dropout_key, splits)
  outs = [_attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], key_mask, dropout_rate, kk)
          for a, b, kk in zip(bounds[:-1], bounds[1:], keys, strict=True)]
  return jnp.concatenate(outs, axis=2)


def _attend(q, k, v, key_mask, dropout_rate, dropout_key):
  # Batch and heads flattened into one batch axis, k laid out (d, Lk): on XLA:CPU ~2x faster
  # than the einsum / jax.nn.dot_product_attention formulations.
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qh = q.transpose(0, 2, 1, 3).reshape(b * h, lq, d)
  kt = k.transpose(0, 2, 3, 1).reshape(b * h, d, lk)
  vh = v.transpose(0, 2, 1, 3).reshape(b * h, lk, d)
  s = jnp.matmul(qh, kt, preferred_element_type=jnp.float32) * (d**-0.5)
  if key_mask is not None:
    s = s.reshape(b, h, lq, lk)
    s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    s = s.reshape(b * h, lq, lk)
  p = jax.nn.softmax(s, axis=-1)
  p = dropout(p, dropout_rate, dropout_key)
  o = jnp.matmul(p.astype(vh.dtype), vh, preferred_element_type=jnp.float32).astype(q.dtype)
  return o.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


class Attention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, attn_drop=0.0, proj_drop=0.0, dtype=None,
               splits: int = 0, rngs):
    if dim % num_heads:
      raise ValueError(f'embedding dim {dim} is not divisible by {num_heads} heads')
    self.num_heads = num_heads
    self.splits = splits or default_attention_splits()
    self.head_dim = dim // num_heads
    self.attn_drop = attn_drop
    self.proj_drop = proj_drop
    self.qkv = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, key_mask=None, query_index=None, dropout_key=None):
    """x [B, L, D] (already normalised). Returns [B, L, D], or [B, n, D] at `query_index`."""
    b, length, dim = x.shape
    h, hd = self.num_heads, self.head_dim
    k1, k2 = split_key(dropout_key, 2)
    if query_index is None:
      qkv = self.qkv(x).reshape(b, length, 3, h, hd)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      # Same parameters, split: q only at the query rows, k/v everywhere.
      kernel, bias = self.qkv.kernel[...], self.qkv.bias[...]
      dtype = self.qkv.dtype or x.dtype
      xq = jnp.take_along_axis(x, query_index[..., None], axis=1)
      q = (xq.astype(dtype) @ kernel[:, :dim].astype(dtype) + bias[:dim].astype(dtype))
      q = q.reshape(b, -1, h, hd)
      kv = x.astype(dtype) @ kernel[:, dim:].astype(dtype) + bias[dim:].astype(dtype)
      kv = kv.reshape(b, length, 2, h, hd)
      k, v = kv[:, :, 0], kv[:, :, 1]
    o = dot_product_attention(q, k, v, key_mask, splits=self.splits,
                              dropout_rate=self.attn_drop, dropout_key=k1)
    o = self.proj(o.reshape(b, o.shape[1], dim))
    return dropout(o, self.proj_drop, k2)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, drop=0.0, dtype=None, rngs):
    self.drop = drop
    self.fc1 = linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, dropout_key=None):
    k1, k2 = split_key(dropout_key, 2)
    x = jax.nn.gelu(self.fc1(x), approximate=False)
    x = self.fc2(dropout(x, self.drop, k1))
    return dropout(x, self.drop, k2)


class Block(nnx.Module):
  """timm `Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm(eps=1e-6))`."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, *, attn_drop=0.0, proj_drop=0.0, dtype=None,
               attn_splits: int = 0, rngs):
    self.dtype = dtype
    self.norm1 = layer_norm(dim, rngs=rngs)
    self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, dtype=dtype,
                          splits=attn_splits, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, dtype=dtype, rngs=rngs)

  def __call__(self, x, key_mask=None, query_index=None, dropout_key=None):
    """x [B, L, D] -> [B, L, D] (or [B, n, D] with `query_index` [B, n])."""
    k1, k2 = split_key(dropout_key, 2)
    y = self.norm1(x).astype(self.dtype or x.dtype)
    a = self.attn(y, key_mask=key_mask, query_index=query_index, dropout_key=k1)
    if query_index is not None:
      x = jnp.take_along_axis(x, query_index[..., None], axis=1)
    x = x + a.astype(x.dtype)
    y = self.norm2(x).astype(self.dtype or x.dtype)
    return x + self.mlp(y, dropout_key=k2).astype(x.dtype)
