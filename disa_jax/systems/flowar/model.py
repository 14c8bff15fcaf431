"""FlowAR's autoregressive trunk (block-causal encoder + decoder over scales) and its flow head.

Official: `FlowAR` in `FlowAR_DiSA/models/flowar.py` (spec §3). Scales m_s = 1, 2, 4, 8, 16 hold
n_s = m_s^2 tokens (row-major), 341 in all; block s spans rows [start_s, end_s) of the learned
position tables. Block 0 is the class embedding itself; block s >= 1 is z_proj(u_s) where u_s is
the next-scale input built from the scale-(s-1) latent (`next_scale.py`).
For the tokens of block s, with condition c (R, D) = class embedding of each row:
  h = RMS_w(tokens + E_enc[s]; z_proj_ln); encoder blocks (adaLN on c); h = RMS_w(h; encoder_norm)
  g = decoder_embed(h) + E_dec[s]; decoder blocks; g = RMS_w(g; decoder_norm)
  z = g + E_diff[s]                                    (R, n_s, D), conditions the flow head
Attention is block-causal. At inference (`trunk_step`) each attention layer keeps an
append-only KV cache (post-RoPE keys, values) of blocks 0..s-1; `trunk_full` runs all blocks
at once with the block-causal mask (training, and a test that the cached path agrees).
RoPE: per block, the scale's positions spread over 16x16 (`disa_jax.layers.rope`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.layers.adaln import AdaLNBlock
from disa_jax.layers.mlp import dense
from disa_jax.layers.norms import RMSNorm
from disa_jax.layers.rope import scale_rope_table
from disa_jax.systems.flowar.config import FlowARConfig
from disa_jax.systems.flowar.head import FlowHead


def block_causal_mask(scales) -> np.ndarray:
  """(L, L) bool: token of block s attends to all tokens of blocks 0..s."""
  block = np.concatenate([np.full(s * s, i) for i, s in enumerate(scales)])
  return block[None, :] <= block[:, None]


def scale_rope(cfg: FlowARConfig, s: int, *, head: bool = False):
  """(cos, sin) of scale s for the trunk (head dim D / H) or the flow head (64)."""
  return tuple(jnp.asarray(a) for a in
               scale_rope_table(cfg.scales[s], 64 if head else cfg.head_dim))


class FlowAR(nnx.Module):
  """FlowAR trunk + flow head; parameter names follow the official state dict."""

  def __init__(self, cfg: FlowARConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, L = cfg.width, cfg.seq_len
    normal = jax.nn.initializers.normal(stddev=0.02)
    self.encoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (1, L, d)))
    self.decoder_pos_embed_learned = nnx.Param(normal(rngs.params(), (1, L, d)))
    self.diffusion_pos_embed_learned = nnx.Param(normal(rngs.params(), (1, L, d)))
    self.class_emb = nnx.Embed(cfg.class_num + 1, d, embedding_init=normal, rngs=rngs)
    self.z_proj = dense(cfg.token_dim, d, rngs=rngs)
    self.z_proj_ln = RMSNorm(d, use_weight=True)
    self.encoder_blocks = nnx.List([AdaLNBlock(d, cfg.heads, cfg.mlp_hidden, rngs=rngs)
                                    for _ in range(cfg.encoder_depth)])
    self.encoder_norm = RMSNorm(d, use_weight=True)
    self.decoder_embed = dense(d, d, rngs=rngs)
    self.decoder_blocks = nnx.List([AdaLNBlock(d, cfg.heads, cfg.mlp_hidden, rngs=rngs)
                                    for _ in range(cfg.decoder_depth)])
    self.decoder_norm = RMSNorm(d, use_weight=True)
    self.flownet = FlowHead(cfg, rngs=rngs)

  # ------------------------------------------------------------------ trunk
  def class_embedding(self, labels):
    return self.class_emb(labels)

  def embed_tokens(self, u):
    """z_proj of next-scale inputs u (R, n, 16) -> (R, n, D)."""
    return self.z_proj(u)

  def _trunk(self, x, cond, rows, rope, caches, mask):
    enc_cache, dec_cache = caches if caches is not None else (None, None)
    new_enc, new_dec = [], []
    h = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, rows[0]:rows[1]])
    for i, blk in enumerate(self.encoder_blocks):
      h, kv = blk(h, cond, rope=rope, cache=None if enc_cache is None else enc_cache[i],
                  mask=mask)
      new_enc.append(kv)
    h = self.encoder_norm(h)
    g = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, rows[0]:rows[1]]
    for i, blk in enumerate(self.decoder_blocks):
      g, kv = blk(g, cond, rope=rope, cache=None if dec_cache is None else dec_cache[i],
                  mask=mask)
      new_dec.append(kv)
    z = self.decoder_norm(g) + self.diffusion_pos_embed_learned[:, rows[0]:rows[1]]
    return z, (tuple(new_enc), tuple(new_dec))

  def trunk_step(self, tokens, cond, s: int, cache=None):
    """Block s of the trunk with the KV cache of blocks < s.

    tokens (R, n_s, D) (s = 0: the class embedding, (R, 1, D)); cond (R, D); cache None at
    s = 0, else the cache returned by the previous step. Returns (z (R, n_s, D), new cache)
    where the cache is ((k, v) per encoder layer, (k, v) per decoder layer), each (R, H, end_s, hd).
    """
    start = self.cfg.starts[s]
    end = start + self.cfg.scales[s] ** 2
    return self._trunk(tokens, cond, (start, end), scale_rope(self.cfg, s), cache, None)

  def trunk_full(self, tokens, cond):
    """All blocks at once with the block-causal mask; tokens (R, L, D) -> z (R, L, D)."""
    tables = [scale_rope_table(m, self.cfg.head_dim) for m in self.cfg.scales]
    rope = tuple(jnp.asarray(np.concatenate([t[i] for t in tables])) for i in range(2))
    mask = jnp.asarray(block_causal_mask(self.cfg.scales))
    z, _ = self._trunk(tokens, cond, (0, self.cfg.seq_len), rope, None, mask)
    return z

  # ------------------------------------------------------------------ head
  def velocity(self, x, tau, z, s: int):
    """Flow-head velocity at scale s: x (R, n_s, 16), tau (R,) int, z (R, n_s, D)."""
    return self.flownet(x, tau, z, scale_rope(self.cfg, s, head=True))
