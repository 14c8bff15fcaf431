"""MAR's per-token diffusion head: `SimpleMLPAdaLN` inside `DiffLoss` (LTH14/mar models/diffloss.py).

  e(t)  = [cos(t f), sin(t f)], f_i = exp(-ln(10000) i / 128)      (256-d, cos first, fp32)
  y     = time_embed(e(t)) + cond_embed(c)                         time_embed = Linear-SiLU-Linear
  h     = input_proj(x)
  ResBlock x d:  shift, scale, gate = Linear(SiLU(y)).split(3)
                 h = h + gate * MLP(LN(h) * (1 + scale) + shift)
  Final:         shift, scale = Linear(SiLU(y)).split(2)
                 out = Linear(LN_noaffine(h) * (1 + scale) + shift)  -> [N, 2C]
out[:, :C] is the eps prediction, out[:, C:] the learned-range variance interpolation v.

The sampler uses the pieces separately (`embed_time`, `embed_cond`, `modulations`,
`trunk_modulated`): the time embedding is shared by all rows of a step, the condition
embedding by all steps of a token, and the adaLN modulations (~60% of the FLOPs) do not depend
on x, so they can be computed for all steps of a chain before the sequential loop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from disa_jax.layers.basic import SiLU, layer_norm, linear, normal_002

FREQUENCY_EMBEDDING_SIZE = 256


def timestep_embedding(t, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
  """Sinusoidal embedding [..., dim] of (possibly fractional) timesteps, cos half first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class TimestepEmbedder(nnx.Module):
  def __init__(self, hidden: int, *, dtype=None, rngs):
    self.mlp = nnx.List([
      linear(FREQUENCY_EMBEDDING_SIZE, hidden, dtype=dtype, kernel_init=normal_002, rngs=rngs),
      SiLU(),
      linear(hidden, hidden, dtype=dtype, kernel_init=normal_002, rngs=rngs),
    ])

  def __call__(self, t):
    h = timestep_embedding(t)
    for layer in self.mlp:
      h = layer(h)
    return h


class ResBlock(nnx.Module):
  def __init__(self, channels: int, *, dtype=None, rngs):
    zeros = jax.nn.initializers.zeros
    self.dtype = dtype
    self.in_ln = layer_norm(channels, rngs=rngs)
    self.mlp = nnx.List([
      linear(channels, channels, dtype=dtype, rngs=rngs),
      SiLU(),
      linear(channels, channels, dtype=dtype, rngs=rngs),
    ])
    self.adaLN_modulation = nnx.List([
      SiLU(),
      linear(channels, 3 * channels, dtype=dtype, kernel_init=zeros, rngs=rngs),
    ])

  def modulation(self, y):
    """(shift, scale, gate) packed as [..., 3W]; depends on y only, not on x."""
    return self.adaLN_modulation[1](self.adaLN_modulation[0](y))

  def branch(self, x, mod):
    """(MLP output, gate) for x and packed modulation mod: the block is x + gate * MLP."""
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    h = modulate(self.in_ln(x).astype(mod.dtype), shift, scale)
    for layer in self.mlp:
      h = layer(h)
    return h, gate

  def apply(self, x, mod):
    h, gate = self.branch(x, mod)
    return x + (gate * h).astype(x.dtype)

  def __call__(self, x, y):
    return self.apply(x, self.modulation(y))


class FinalLayer(nnx.Module):
  def __init__(self, channels: int, out_channels: int, *, dtype=None, rngs):
    zeros = jax.nn.initializers.zeros
    self.norm_final = layer_norm(channels, affine=False, rngs=rngs)
    self.linear = linear(channels, out_channels, dtype=dtype, kernel_init=zeros, rngs=rngs)
    self.adaLN_modulation = nnx.List([
      SiLU(),
      linear(channels, 2 * channels, dtype=dtype, kernel_init=zeros, rngs=rngs),
    ])

  def modulation(self, y):
    return self.adaLN_modulation[1](self.adaLN_modulation[0](y))

  def apply(self, x, mod):
    shift, scale = jnp.split(mod, 2, axis=-1)
    return self.linear(modulate(self.norm_final(x).astype(mod.dtype), shift, scale))

  def __call__(self, x, y):
    return self.apply(x, self.modulation(y))


class SimpleMLPAdaLN(nnx.Module):
  """The diffusion MLP. `__call__(x [N, C], t [N], c [N, Dz]) -> [N, 2C]` (official layout)."""

  def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
               num_res_blocks: int, *, dtype=None, rngs):
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.time_embed = TimestepEmbedder(model_channels, dtype=dtype, rngs=rngs)
    self.cond_embed = linear(z_channels, model_channels, dtype=dtype, rngs=rngs)
    self.input_proj = linear(in_channels, model_channels, dtype=dtype, rngs=rngs)
    self.res_blocks = nnx.List(
      [ResBlock(model_channels, dtype=dtype, rngs=rngs) for _ in range(num_res_blocks)]
    )
    self.final_layer = FinalLayer(model_channels, out_channels, dtype=dtype, rngs=rngs)

  def embed_time(self, t):
    return self.time_embed(t)

  def embed_cond(self, c):
    return self.cond_embed(c)

  def trunk(self, x, y):
    """Residual blocks + final layer from the input x [..., C] and embedding y [..., W]."""
    return self.trunk_modulated(x, self.modulations(y))

  def modulations(self, y) -> tuple:
    """All adaLN modulations for embedding y [..., W]: one [..., 3W] per block + [..., 2W].

    They depend on (condition, timestep) only, so a sampler can compute them for every step
    of a chain at once (large matmuls) before the sequential loop over x.
    """
    return tuple(b.modulation(y) for b in self.res_blocks) + (self.final_layer.modulation(y),)

  def modulation_width(self) -> int:
    """Feature count of `modulations` per row (for memory budgeting)."""
    w = self.final_layer.linear.in_features
    return len(self.res_blocks) * 3 * w + 2 * w

  def trunk_modulated(self, x, mods):
    """`trunk` with precomputed `modulations` (rows of `mods` match rows of x)."""
    h = self.input_proj(x).astype(jnp.float32)
    for block, mod in zip(self.res_blocks, mods[:-1], strict=True):
      h = block.apply(h, mod)
    return self.final_layer.apply(h, mods[-1]).astype(jnp.float32)

  def __call__(self, x, t, c):
    y = self.embed_time(t) + self.embed_cond(c)
    return self.trunk(x, y)

  def forward_with_cfg(self, x, t, c, cfg_scale):
    """Official CFG call: x, c have 2N rows (cond, uncond); the net sees the cond half twice,
    eps is guided, the variance channels of each half are kept."""
    n = x.shape[0] // 2
    half = x[:n]
    out = self(jnp.concatenate([half, half], axis=0), t, c)
    eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
    guided = eps[n:] + cfg_scale * (eps[:n] - eps[n:])
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=1)


class DiffLoss(nnx.Module):
  """Holds the head as `.net` so the state tree matches the official `diffloss.net.*` keys."""

  def __init__(self, target_channels: int, z_channels: int, depth: int, width: int, *,
               dtype=None, rngs):
    self.in_channels = target_channels
    self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                              dtype=dtype, rngs=rngs)
