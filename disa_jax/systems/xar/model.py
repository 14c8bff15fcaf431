"""xAR (Ren et al. 2025): next-cell AR where the whole encoder-decoder transformer is the
velocity network of the flow sampler.

Official: `xAR` in `xAR_DiSA/models/xar.py` (= OliverRensu/xAR), spec `flowar_xar.md` §5.
Token layout: the 16x16 latent is split into 2x2 cells of 8x8; the model works in cell-major
order, token p = 64 cell + 8 r + c (r, c raster inside the cell), global position
(8 floor(cell / 2) + r, 8 (cell mod 2) + c). Position tables (1, 256, D) and the RoPE table are
indexed in this order (`cell_positions`, `cell_rope_table`).
A call processes C consecutive cells [first, first + C) (tokens x (R, 64 C, 16)) with one
condition per cell c_k = class_emb(y) + TE(tau_k):
  h = RMS_w(z_proj(x) + E_enc[p]; z_proj_ln); encoder blocks; h = RMS_w(h; encoder_norm)
  g = decoder_embed(h) + E_dec[p]; decoder blocks; g = RMS_w(g; decoder_norm); v = pred(g)
Every block is the shared adaLN block (`disa_jax.layers.adaln.AdaLNBlock`: gates/scales/shifts
gamma1, gamma2, alpha1, alpha2, beta1, beta2 of Linear(SiLU(c_k)), exact-GELU gated MLP, RoPE
self-attention with qkv bias); the modulation is computed once per cell and broadcast to its
64 tokens (`cell_block`). Attention is cell-causal (a token of cell k sees cells 0..k).
KV cache (`forward_cells(cache=...)`): per attention layer the post-RoPE keys / values of the
cells before `first`; the call appends its own and returns them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.layers.adaln import AdaLNBlock, TimestepEmbedder, chunks, modulate
from disa_jax.layers.mlp import dense
from disa_jax.layers.norms import RMSNorm
from disa_jax.layers.rope import rope_freqs, rope_table
from disa_jax.systems.xar.config import XARConfig


def cell_positions(cfg: XARConfig) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols) (L,) int of the cell-major token order."""
  p = np.arange(cfg.seq_len)
  cell, inner = p // cfg.cell_tokens, p % cfg.cell_tokens
  rows = cfg.cell * (cell // cfg.cells_per_side) + inner // cfg.cell
  cols = cfg.cell * (cell % cfg.cells_per_side) + inner % cfg.cell
  return rows, cols


def cell_order(cfg: XARConfig) -> np.ndarray:
  """(L,) raster index (row * grid + col) of each cell-major token."""
  rows, cols = cell_positions(cfg)
  return rows * cfg.grid + cols


def cell_rope_table(cfg: XARConfig) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin) (L, hd) float32: the 16x16 integer-position table permuted to cell order
  (the checkpoint buffers `*.rope.freqs_cos / freqs_sin`)."""
  rows, cols = cell_positions(cfg)
  return rope_table(rows, cols, rope_freqs(cfg.head_dim))


def cell_causal_mask(cfg: XARConfig) -> np.ndarray:
  """(L, L) bool: token of cell k attends to cells 0..k."""
  cell = np.arange(cfg.seq_len) // cfg.cell_tokens
  return cell[None, :] <= cell[:, None]


def to_raster(tokens, cfg: XARConfig):
  """(B, L, C) cell-major tokens -> (B, C, grid, grid) channel-first latent."""
  b, _, c = tokens.shape
  raster = jnp.zeros_like(tokens).at[:, cell_order(cfg)].set(tokens)
  return raster.reshape(b, cfg.grid, cfg.grid, c).transpose(0, 3, 1, 2)


def cell_block(blk: AdaLNBlock, x, cond, *, rope, cache, mask, cell_tokens: int):
  """The adaLN block with one condition per cell: x (R, C * n, D), cond (R, C, D)."""
  r, n, d = x.shape
  c = cond.shape[1]
  m = blk.ada_lin[1](blk.ada_lin[0](cond))[:, :, None, :]          # (R, C, 1, 6D)
  g1, g2, a1, a2, b1, b2 = chunks(m, 6)

  def mod(y, scale, shift):
    return modulate(y.reshape(r, c, cell_tokens, d), scale, shift).reshape(r, n, d)

  def gate(y, g):
    return (y.reshape(r, c, cell_tokens, d) * g).reshape(r, n, d)

  h, kv = blk.attn.with_cache(mod(blk.norm1(x), a1, b1), cache, rope=rope, mask=mask)
  x = x + gate(h, g1)
  x = x + gate(blk.mlp(mod(blk.norm2(x), a2, b2)), g2)
  return x, kv


class XAR(nnx.Module):
  """xAR trunk = velocity network; parameter names follow the official state dict."""

  def __init__(self, cfg: XARConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, L = cfg.width, cfg.seq_len
    normal = jax.nn.initializers.normal(stddev=0.02)
    self.encoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (1, L, d)))
    self.decoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (1, L, d)))
    self.class_emb = nnx.Embed(cfg.class_num + 1, d, embedding_init=normal, rngs=rngs)
    self.time_embed = TimestepEmbedder(d, rngs=rngs)
    self.z_proj = dense(cfg.token_dim, d, rngs=rngs)
    self.z_proj_ln = RMSNorm(d, use_weight=True)
    self.encoder_blocks = nnx.List([AdaLNBlock(d, cfg.heads, cfg.mlp_hidden, rngs=rngs)
                                    for _ in range(cfg.encoder_depth)])
    self.encoder_norm = RMSNorm(d, use_weight=True)
    self.decoder_embed = dense(d, d, rngs=rngs)
    self.decoder_blocks = nnx.List([AdaLNBlock(d, cfg.heads, cfg.mlp_hidden, rngs=rngs)
                                    for _ in range(cfg.decoder_depth)])
    self.decoder_norm = RMSNorm(d, use_weight=True)
    self.pred = dense(d, cfg.token_dim, rngs=rngs)

  def cell_condition(self, labels, tau):
    """c = class_emb(labels) + TE(tau); labels (R,) int, tau (R,) int -> (R, D)."""
    return self.class_emb(labels) + self.time_embed(tau)

  def forward_cells(self, x, cond, first: int, *, cache=None, mask=None):
    """Velocity of cells [first, first + C): x (R, 64 C, 16), cond (R, C, D).

    cache: None or ((k, v) per encoder layer, (k, v) per decoder layer), each
    (R, H, M, hd) with the keys of the M tokens before the call; mask: None or a bool
    (64 C, M + 64 C) array. Returns (v (R, 64 C, 16), caches incl. this call's keys)."""
    n = self.cfg.cell_tokens
    p0, p1 = first * n, first * n + x.shape[1]
    cos, sin = cell_rope_table(self.cfg)
    rope = (jnp.asarray(cos[p0:p1]), jnp.asarray(sin[p0:p1]))
    enc_cache, dec_cache = cache if cache is not None else (None, None)
    new_enc, new_dec = [], []
    h = self.z_proj_ln(self.z_proj(x) + self.encoder_pos_embed_learned[:, p0:p1])
    for i, blk in enumerate(self.encoder_blocks):
      h, kv = cell_block(blk, h, cond, rope=rope, mask=mask, cell_tokens=n,
                         cache=None if enc_cache is None else enc_cache[i])
      new_enc.append(kv)
    h = self.encoder_norm(h)
    g = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, p0:p1]
    for i, blk in enumerate(self.decoder_blocks):
      g, kv = cell_block(blk, g, cond, rope=rope, mask=mask, cell_tokens=n,
                         cache=None if dec_cache is None else dec_cache[i])
      new_dec.append(kv)
    return self.pred(self.decoder_norm(g)), (tuple(new_enc), tuple(new_dec))

  def forward_full(self, x, labels, tau):
    """All cells at once with the cell-causal mask (training form): x (R, L, 16) cell-major,
    labels (R,), tau (R, cells) int -> v (R, L, 16)."""
    conds = jnp.stack([self.cell_condition(labels, tau[:, k])
                       for k in range(self.cfg.num_cells)], axis=1)
    mask = jnp.asarray(cell_causal_mask(self.cfg))
    v, _ = self.forward_cells(x, conds, 0, mask=mask)
    return v
