"""Neural layers of D-AR. The math shared with the other systems comes from `disa_jax.layers`:
the RMS normalisation (`layers.norms.rms_normalize`) and the pair rotation of RoPE
(`layers.rope.apply_rope`, bitwise the same as the (a cos - b sin, a sin + b cos) form in
float32). Kept here because they differ from the shared modules: `RMSNorm` stores its vector
as `weight` (the official key; the shared one stores `scale`) with eps 1e-5; `SwiGLU` is
w2(silu(w1 x) * w3 x) without biases (the shared `layers.mlp.GatedMLP` is FlowAR's exact-GELU
gate with biases); the RoPE tables are D-AR's own (flux 2-D split, GPT 1-D in float32).

Matches showlab/D-AR @ 3fb0f2d:
  tokenizer/tokenizer_image/tokenizer_transformer.py  (Attention with qk-norm, TransformerBlock,
                                                       flux 2-D RoPE)
  tokenizer/tokenizer_image/diff_decoder.py           (TimestepEmbedder, SiTBlock)
  autoregressive/models/gpt.py                        (RMSNorm, SwiGLU FeedForward, 1-D RoPE)

Conventions: tokens (B, N, D); heads (B, H, N, 64); Linear kernels stored (in, out).
  LayerNorm: eps 1e-6, two-pass variance, float32.   RMSNorm: x * rsqrt(mean(x^2) + 1e-5) * w.
  2-D RoPE (flux): head split in 32 interleaved pairs (2i, 2i+1); pairs 0..15 rotate by
    row * w_i, pairs 16..31 by column * w_(i-16), w_k = theta^(-k/16).
  1-D RoPE (GPT): pairs (2k, 2k+1) rotate by position * theta^(-2k/64).
  Rotation: (a, b) -> (a cos - b sin, a sin + b cos).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.layers import rope as shared_rope
from disa_jax.layers.norms import rms_normalize

HEAD_DIM = 64   # every D-AR attention (the 2-D RoPE axes [32, 32] fix it)


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                    kernel_init=jax.nn.initializers.normal(0.02))


def layer_norm(features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Affine LayerNorm, eps 1e-6, two-pass variance (torch's numerics)."""
  return nnx.LayerNorm(features, epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
                       rngs=rngs)


def plain_norm(x):
  """LayerNorm without affine parameters (eps 1e-6), computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


# --------------------------------------------------------------------------------- RoPE tables
def rope_2d_table(height: int, width: int, theta: float = 10000.0, axis_dim: int = 32):
  """(cos, sin), each (height * width, 32) float32, row-major tokens; computed in float64."""
  omega = 1.0 / theta ** (np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing='ij')
  angle = np.concatenate([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], axis=1)
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope_1d_table(length: int, head_dim: int = HEAD_DIM, base: float = 10000.0):
  """(cos, sin), each (length, head_dim // 2) float32, as gpt.py's precompute_freqs_cis_1d
  (frequencies and angles in float32)."""
  freqs = (np.float32(1.0) / (np.float32(base) ** (
    np.arange(0, head_dim, 2, dtype=np.float32)[: head_dim // 2] / np.float32(head_dim))))
  angle = np.outer(np.arange(length, dtype=np.float32), freqs.astype(np.float32))
  angle = angle.astype(np.float32).astype(np.float64)
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs of the last axis of x (..., N, d) by tables (N, d/2), in
  float32 (`disa_jax.layers.rope.apply_rope` over the per-pair tables repeated to (N, d))."""
  table = (jnp.repeat(jnp.asarray(cos, jnp.float32), 2, axis=-1),
           jnp.repeat(jnp.asarray(sin, jnp.float32), 2, axis=-1))
  return shared_rope.apply_rope(x.astype(jnp.float32), table).astype(x.dtype)


def attend(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v over (B, H, N, d) x (B, H, M, d); mask (.., N, M), True = attend."""
  s = jnp.einsum('bhnd,bhmd->bhnm', q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum('bhnm,bhmd->bhnd', p, v)


# ------------------------------------------------------------------------------ tokenizer layers
class Mlp(nnx.Module):
  """fc2(silu(fc1(x))) (timm Mlp with act_layer SiLU)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, rngs=rngs)
    self.fc2 = dense(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.silu(self.fc1(x)))


class Attention(nnx.Module):
  """Tokenizer attention: q/k/v/proj Linear (bias), per-head affine LayerNorm on q and k,
  optional RoPE (on q and k, or on q only for cross-attention)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.heads = dim // HEAD_DIM
    self.q = dense(dim, dim, rngs=rngs)
    self.k = dense(dim, dim, rngs=rngs)
    self.v = dense(dim, dim, rngs=rngs)
    self.q_norm = layer_norm(HEAD_DIM, rngs=rngs)
    self.k_norm = layer_norm(HEAD_DIM, rngs=rngs)
    self.proj = dense(dim, dim, rngs=rngs)

  def _heads(self, x):
    b, n, _ = x.shape
    return x.reshape(b, n, self.heads, HEAD_DIM).transpose(0, 2, 1, 3)

  def __call__(self, x, kv=None, *, mask=None, rope=None, rope_q=None):
    """x (B, N, D) queries; kv (B, M, D) keys/values (default x). rope = (cos, sin) for q and k;
    rope_q = (cos, sin) for q only."""
    kv = x if kv is None else kv
    q = self.q_norm(self._heads(self.q(x)))
    k = self.k_norm(self._heads(self.k(kv)))
    v = self._heads(self.v(kv))
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if rope_q is not None:
      q = apply_rope(q, *rope_q)
    out = attend(q, k, v, mask)
    b, _, n, _ = out.shape
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class TransformerBlock(nnx.Module):
  """Encoder / token-decoder layer: x += gate1 * Attn(LN1 x); x += gate2 * MLP(LN2 x)."""

  def __init__(self, dim: int, *, mlp_ratio: int = 4, rngs: nnx.Rngs):
    self.attention = Attention(dim, rngs=rngs)
    self.mlp = Mlp(dim, dim * mlp_ratio, rngs=rngs)
    self.norm1 = layer_norm(dim, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs=rngs)
    self.gate1 = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.gate2 = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x, *, mask=None, rope=None):
    x = x + self.attention(self.norm1(x), mask=mask, rope=rope) * self.gate1[...]
    return x + self.mlp(self.norm2(x)) * self.gate2[...]


def timestep_features(t, dim: int, max_period: float = 10000.0):
  """[cos(t f), sin(t f)] with f_k = exp(-ln(max_period) k / (dim/2)); t (B,) -> (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TwoLayerMlp(nnx.Module):
  """linear2(silu(linear1(x))) (the official `nn.Sequential(Linear, SiLU, Linear)`)."""

  def __init__(self, d_in: int, dim: int, *, rngs: nnx.Rngs):
    self.linear1 = dense(d_in, dim, rngs=rngs)
    self.linear2 = dense(dim, dim, rngs=rngs)

  def __call__(self, x):
    return self.linear2(jax.nn.silu(self.linear1(x)))


class SiTBlock(nnx.Module):
  """Pixel-decoder block (diff_decoder.py SiTBlock, share_time_encoding false).

    tau = TimeMLP(sinusoid(1000 t'))            (B, 1, D)
    c   = LN(CondMLP(cond))                     (B, M, D)
    r   = CrossAttn(q = LN x with RoPE on q, kv = c)
    m   = adaLN(silu(tau + r))  -> 6 chunks (per token)
    x  += gate_a * SelfAttn(LN x (1 + scale_a) + shift_a);  x += gate_m * MLP(...)
  """

  def __init__(self, dim: int, *, mlp_ratio: int = 4, rngs: nnx.Rngs):
    self.attention = Attention(dim, rngs=rngs)
    self.cross_attn = Attention(dim, rngs=rngs)
    self.mlp = Mlp(dim, dim * mlp_ratio, rngs=rngs)
    self.adaLN_modulation = dense(dim, 6 * dim, rngs=rngs)
    self.time_embed = TwoLayerMlp(dim, dim, rngs=rngs)
    self.cond_embed = TwoLayerMlp(dim, dim, rngs=rngs)

  def __call__(self, x, cond, t, rope):
    dim = x.shape[-1]
    tau = self.time_embed(timestep_features(t * 1000.0, dim))[:, None]
    c = plain_norm(self.cond_embed(cond))
    r = self.cross_attn(plain_norm(x), c, rope_q=rope)
    mod = self.adaLN_modulation(jax.nn.silu(tau + r))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    x = x + gate_a * self.attention(plain_norm(x) * (1 + scale_a) + shift_a, rope=rope)
    return x + gate_m * self.mlp(plain_norm(x) * (1 + scale_m) + shift_m)


# ------------------------------------------------------------------------------------ GPT layers
class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float = 1e-5):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


class SwiGLU(nnx.Module):
  """w2(silu(w1 x) * w3 x), no biases."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w1 = dense(dim, hidden, rngs=rngs, bias=False)
    self.w3 = dense(dim, hidden, rngs=rngs, bias=False)
    self.w2 = dense(hidden, dim, rngs=rngs, bias=False)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
  """round_up(int(2 * 4 dim / 3), multiple_of) (gpt.py FeedForward)."""
  h = int(2 * (4 * dim) / 3)
  return h if h % multiple_of == 0 else h + multiple_of - h % multiple_of
