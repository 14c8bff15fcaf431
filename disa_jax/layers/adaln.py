"""adaLN conditioning of FlowAR / xAR: the modulated trunk block and the timestep embedder.

Official: `Block` in `FlowAR_DiSA/models/flowar.py` (= xAR's trunk block) and
`TimestepEmbedder` in `FlowAR_DiSA/models/flowmodel.py` / `xAR_DiSA/models/xar.py`.

Trunk block, residual x (B, N, D), condition c (B, D) or (B, N, D):
  m = ada_lin(c) = Linear(D -> 6D)(SiLU(c))         torch key `ada_lin.1`
  gamma1, gamma2, alpha1, alpha2, beta1, beta2 = six consecutive D-wide chunks of m
  x <- x + gamma1 * Attn(RMS(x) * (1 + alpha1) + beta1)
  x <- x + gamma2 * MLP(RMS(x) * (1 + alpha2) + beta2)
RMS is parameter-free (`norms.py`), MLP the exact-GELU gated MLP (`mlp.py`), Attn the RoPE
self-attention with qkv bias (`attention.py`).

Timestep embedder, integer tau (B,):
  phi_k = exp(-ln(10000) k / 128), k = 0..127;  e = [cos(tau phi) | sin(tau phi)]   (256,)
  TE(tau) = Linear(W -> W)(SiLU(Linear(256 -> W)(e)))  torch keys `mlp.0`, `mlp.2`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.layers.attention import SelfAttention
from disa_jax.layers.mlp import GatedMLP, dense
from disa_jax.layers.norms import RMSNorm

FREQUENCY_EMBEDDING = 256


class SiLU(nnx.Module):
  """Parameter-free x * sigmoid(x): keeps the official `Sequential` indices in the state tree."""

  def __call__(self, x):
    return jax.nn.silu(x)


def modulate(x, scale, shift):
  """x * (1 + scale) + shift (the official `.mul(scale.add(1)).add_(shift)`)."""
  return x * (1 + scale) + shift


def chunks(m, n: int):
  """Splits the last axis of m into n equal chunks (a list)."""
  return list(jnp.split(m, n, axis=-1))


def _per_token(m, x):
  """Broadcasts a per-row modulation (B, k) to (B, 1, k) against x (B, N, D)."""
  return m[:, None, :] if m.ndim == x.ndim - 1 else m


class AdaLNBlock(nnx.Module):
  """The FlowAR / xAR trunk block (RMS + adaLN + RoPE self-attention + gated MLP)."""

  def __init__(self, dim: int, heads: int, mlp_hidden: int, *, rngs: nnx.Rngs,
               qkv_bias: bool = True):
    self.dim = dim
    self.norm1 = RMSNorm(dim)
    self.attn = SelfAttention(dim, heads, qkv_bias=qkv_bias, rngs=rngs)
    self.norm2 = RMSNorm(dim)
    self.mlp = GatedMLP(dim, mlp_hidden, rngs=rngs)
    self.ada_lin = nnx.List([SiLU(), dense(dim, 6 * dim, rngs=rngs)])

  def __call__(self, x, cond, *, rope=None, cache=None, mask=None):
    """(x, (k, v)): the block output and the attention's keys/values incl. `cache`."""
    m = _per_token(self.ada_lin[1](self.ada_lin[0](cond)), x)
    g1, g2, a1, a2, b1, b2 = chunks(m, 6)
    h, kv = self.attn.with_cache(modulate(self.norm1(x), a1, b1), cache, rope=rope, mask=mask)
    x = x + h * g1
    x = x + self.mlp(modulate(self.norm2(x), a2, b2)) * g2
    return x, kv


def timestep_embedding(tau, dim: int = FREQUENCY_EMBEDDING, max_period: float = 10000.0):
  """[cos(tau phi) | sin(tau phi)], (B, dim) float32, phi_k = exp(-ln(max_period) k / (dim/2))."""
  half = dim // 2
  # exponent in float32 as torch computes it; exp correctly rounded host-side (closer to torch's
  # exp than XLA's, which matters at tau = 1000)
  expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
  args = tau.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """TE(tau) = mlp.2(SiLU(mlp.0(sinusoid(tau)))) of width `dim`; tau an integer array (B,)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal(stddev=0.02)
    first = nnx.Linear(FREQUENCY_EMBEDDING, dim, kernel_init=normal,
                       bias_init=jax.nn.initializers.zeros, rngs=rngs)
    second = nnx.Linear(dim, dim, kernel_init=normal, bias_init=jax.nn.initializers.zeros,
                        rngs=rngs)
    self.mlp = nnx.List([first, SiLU(), second])

  def __call__(self, tau):
    return self.mlp[2](self.mlp[1](self.mlp[0](timestep_embedding(tau))))
