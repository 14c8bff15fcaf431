"""FlowAR's flow head `SimpleTransformerAdaLN` (velocity prediction for one scale's tokens).

Official: `FlowAR_DiSA/models/flowmodel.py` (spec §3.5). Inputs x_t (R, n, 16), integer tau (R,),
trunk output z (R, n, D), the scale's RoPE table; all n tokens attend to each other (no mask).
  h = input_proj(x_t);  te = TE(tau) (R, 1, W);  cz = cond_embed(z) (R, n, W)
  block v1 (FlowAR-S), `HeadSelfBlock`:
    gamma1, gamma2, alpha1, alpha2, beta1, beta2 = ada_lin(SiLU(te + cz))        (per token)
    h += gamma1 * SelfAttn(RMS(h)(1 + alpha1) + beta1);  h += gamma2 * MLP(RMS(h)(1 + alpha2) + beta2)
  block v2 (FlowAR-L/H), `HeadCrossBlock`:
    gamma1, alpha1, beta1 = ada_lin_attn(SiLU(te))   (per row);  gamma2, alpha2, beta2 =
    ada_lin_mlp(SiLU(cz + te)) (per token)
    h += gamma1 * SelfAttn(RMS(h)(1 + alpha1) + beta1)
    h += CrossAttn(q: RMS_w(h; norm2_1), k/v: RMS_w(z; norm2_2))     (no gate, no modulation)
    h += gamma2 * MLP(RMS(h)(1 + alpha2) + beta2)
  final: shift, scale = adaLN_modulation(cz + te) (SiLU inside, shift first);
    v = linear(RMS(h)(1 + scale) + shift)
Head attention: W / 64 heads, qkv without bias; RoPE with the scale's positions.
"""

from __future__ import annotations

from flax import nnx

from disa_jax.layers.adaln import SiLU, TimestepEmbedder, chunks, modulate
from disa_jax.layers.attention import CrossAttention, SelfAttention
from disa_jax.layers.mlp import GatedMLP, dense
from disa_jax.layers.norms import RMSNorm
from disa_jax.systems.flowar.config import FlowARConfig


class HeadSelfBlock(nnx.Module):
  """Head block v1 (FlowAR-S): adaLN from te + cz, self-attention, gated MLP."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(width)
    self.attn = SelfAttention(width, width // 64, qkv_bias=False, rngs=rngs)
    self.norm2 = RMSNorm(width)
    self.mlp = GatedMLP(width, hidden, rngs=rngs)
    self.ada_lin = dense(width, 6 * width, rngs=rngs)

  def __call__(self, h, te, cz, z, rope):
    g1, g2, a1, a2, b1, b2 = chunks(self.ada_lin(nnx.silu(te + cz)), 6)
    h = h + self.attn(modulate(self.norm1(h), a1, b1), rope=rope) * g1
    return h + self.mlp(modulate(self.norm2(h), a2, b2)) * g2


class HeadCrossBlock(nnx.Module):
  """Head block v2 (FlowAR-L/H): time-only adaLN on attention, cross-attention to z, MLP."""

  def __init__(self, width: int, context_dim: int, hidden: int, *, rngs: nnx.Rngs):
    heads = width // 64
    self.norm1 = RMSNorm(width)
    self.attn = SelfAttention(width, heads, qkv_bias=False, rngs=rngs)
    self.crossattn = CrossAttention(width, context_dim, heads, rngs=rngs)
    self.norm2_1 = RMSNorm(width, use_weight=True)
    self.norm2_2 = RMSNorm(context_dim, use_weight=True)
    self.norm3 = RMSNorm(width)
    self.mlp = GatedMLP(width, hidden, rngs=rngs)
    self.ada_lin_attn = dense(width, 3 * width, rngs=rngs)
    self.ada_lin_mlp = dense(width, 3 * width, rngs=rngs)

  def __call__(self, h, te, cz, z, rope):
    g1, a1, b1 = chunks(self.ada_lin_attn(nnx.silu(te)), 3)
    g2, a2, b2 = chunks(self.ada_lin_mlp(nnx.silu(cz + te)), 3)
    h = h + self.attn(modulate(self.norm1(h), a1, b1), rope=rope) * g1
    h = h + self.crossattn(self.norm2_1(h), self.norm2_2(z), rope=rope)
    return h + self.mlp(modulate(self.norm3(h), a2, b2)) * g2


class FinalLayer(nnx.Module):
  """v = linear(RMS(h)(1 + scale) + shift), (shift, scale) = adaLN_modulation(c)."""

  def __init__(self, width: int, out: int, *, rngs: nnx.Rngs):
    self.norm_final = RMSNorm(width)
    self.linear = dense(width, out, rngs=rngs)
    self.adaLN_modulation = nnx.List([SiLU(), dense(width, 2 * width, rngs=rngs)])

  def __call__(self, h, c):
    shift, scale = chunks(self.adaLN_modulation[1](self.adaLN_modulation[0](c)), 2)
    return self.linear(modulate(self.norm_final(h), scale, shift))


class FlowHead(nnx.Module):
  """`SimpleTransformerAdaLN`: v = head(x_t, tau, z, rope) for one scale."""

  def __init__(self, cfg: FlowARConfig, *, rngs: nnx.Rngs):
    w = cfg.head_width
    self.time_embed = TimestepEmbedder(w, rngs=rngs)
    self.cond_embed = dense(cfg.width, w, rngs=rngs)
    self.input_proj = dense(cfg.token_dim, w, rngs=rngs)
    if cfg.head_cross:
      blocks = [HeadCrossBlock(w, cfg.width, cfg.head_mlp_hidden, rngs=rngs)
                for _ in range(cfg.head_depth)]
    else:
      blocks = [HeadSelfBlock(w, cfg.head_mlp_hidden, rngs=rngs) for _ in range(cfg.head_depth)]
    self.res_blocks = nnx.List(blocks)
    self.final_layer = FinalLayer(w, cfg.token_dim, rngs=rngs)

  def __call__(self, x, tau, z, rope):
    """x (R, n, 16), tau (R,) int, z (R, n, D), rope (cos, sin) (n, 64) -> v (R, n, 16)."""
    h = self.input_proj(x)
    te = self.time_embed(tau)[:, None, :]
    cz = self.cond_embed(z)
    for block in self.res_blocks:
      h = block(h, te, cz, z, rope)
    return self.final_layer(h, cz + te)
