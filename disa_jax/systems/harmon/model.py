"""Harmon: MAR encoder -> Qwen2 trunk -> MAR decoder, with MAR's diffusion head
(wusize/Harmon src/models/harmon.py, src/models/mar/mar.py; shared/spec/harmon.md §1.5-1.6).

Shapes: R LLM rows (cond / uncond prompts), L = m n image tokens, C = 16 token channels,
nb = 64 buffer slots, V visible tokens (V_pad with bucket padding), D MAR width, H LLM width.
One MAR iteration on rows sharing tokens X [R, L, C] and visible positions P [R, V_pad]:

  x_enc = MAR.encode(X[P], P, fake_latent)                 [R, nb + V_pad, D] (buffers first)
  u     = proj_in(x_enc)                                   [R, nb + V_pad, H]
  seg   = [u_visible (V, ascending raster) ; u_buffers (nb) ; pads]   (buffers moved to the END)
  h     = Qwen2(seg | prompt KV cache), positions v_r + j  (causal; pads after every real token)
  x_dec = x_enc + proj_out(h back in encoder order)        (buffers back in FRONT; residual)
  z     = MAR.decode(x_dec, P)                             [R, n_query, Dd] (diffusion conditions)

`proj_in` / `proj_out` are Linear-SiLU-Linear (state keys `proj_in.0`, `proj_in.2`). The MAR is
the ImageNet MAR module; at a run-time grid other than its 16 x 16 parameter grid the image rows
of the encoder / decoder pos-embeds (buffer rows kept) and the whole diffusion pos-embed are
resized bilinearly (PyTorch `interpolate(mode='bilinear')`: half-pixel centres, edge clamp, no
antialias) once, by `at_image_size`, instead of every forward as the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.layers.basic import SiLU, linear
from disa_jax.layers.qwen2 import KVCache, Qwen2ForCausalLM
from disa_jax.systems.harmon.config import HarmonConfig
from disa_jax.systems.mar.model import MAR


def _mlp(din, dhid, dout, dtype, rngs):
  return nnx.List([linear(din, dhid, dtype=dtype, rngs=rngs), SiLU(),
                   linear(dhid, dout, dtype=dtype, rngs=rngs)])


def _apply(seq, x):
  for layer in seq:
    x = layer(x)
  return x


class Harmon(nnx.Module):
  """Harmon's generation path. Attribute names mirror the official state dict
  (`llm.model.*`, `mar.*`, `proj_in.*`, `proj_out.*`)."""

  def __init__(self, config: HarmonConfig, *, rngs: nnx.Rngs, runtime: bool = False):
    """runtime=False builds the checkpoint shapes (16 x 16 MAR grid); True the run-time grid."""
    self.config = config
    dt = None if config.dtype == 'float32' else config.llm.compute_dtype
    mar_cfg = config.runtime_mar if runtime else config.mar
    d, h = config.mar.encoder_embed_dim, config.llm.hidden_size
    self.llm = Qwen2ForCausalLM(config.llm, rngs=rngs)
    self.mar = MAR(mar_cfg, rngs=rngs)
    self.proj_in = _mlp(d, h, h, dt, rngs)
    self.proj_out = _mlp(h, h, d, dt, rngs)

  @property
  def grid(self) -> int:
    return self.mar.config.seq_h

  # ---------------------------------------------------------------------------------------
  def prefill(self, prompt_ids, prompt_valid) -> KVCache:
    """Prompt KV cache of right-padded ids [R, Lp] (valid [R, Lp]); computed once per batch."""
    llm = self.llm.model
    _, cache = llm.prefill(llm.embed(prompt_ids), prompt_valid)
    return cache

  def backbone(self, tokens_vis, vis_pos, vis_valid, num_visible, cache: KVCache,
               query_pos=None):
    """One MAR iteration up to the diffusion conditions.

    tokens_vis [R, V_pad, C] at ascending raster positions vis_pos [R, V_pad] (the first
    `num_visible` valid, the same count in every row; padding after them); cache: the prompt
    KV cache of the R rows. Returns z [R, L, Dd], or [R, n, Dd] at `query_pos` [R, n].
    """
    mar = self.mar
    nb = mar.config.buffer_size
    r, vpad = vis_pos.shape
    fake = jnp.broadcast_to(mar.fake_latent[...], (r, mar.fake_latent.shape[-1]))
    x_enc = mar.encode(tokens_vis, vis_pos, fake, valid=vis_valid)        # [R, nb+Vp, D]
    u = _apply(self.proj_in, x_enc)
    j = jnp.arange(nb + vpad)
    v = jnp.asarray(num_visible, jnp.int32)
    to_llm = jnp.where(j < v, nb + j, jnp.where(j < v + nb, j - v, j))
    seg = u[:, to_llm]
    prompt_len = jnp.sum(cache.valid, axis=1).astype(jnp.int32)          # v_r
    positions = prompt_len[:, None] + j[None]
    key_valid = jnp.broadcast_to(j < v + nb, (r, nb + vpad))
    h = self.llm.model(seg, positions, cache=cache, key_valid=key_valid)
    to_enc = jnp.where(j < nb, v + j, jnp.where(j < nb + v, j - nb, j))
    x_dec = x_enc + _apply(self.proj_out, h[:, to_enc]).astype(x_enc.dtype)
    return mar.decode(x_dec, vis_pos, valid=vis_valid, query_positions=query_pos)


# -----------------------------------------------------------------------------------------
def bilinear_resize_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights of PyTorch's 1-D bilinear interpolation (align_corners=False, no
  antialias): source coordinate (i + 0.5) * src / dst - 0.5, clamped at 0, right edge clamped."""
  w = np.zeros((dst, src), np.float64)
  scale = src / dst
  for i in range(dst):
    x = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(x), src - 1)
    i1 = min(i0 + 1, src - 1)
    lam = x - i0
    w[i, i0] += 1.0 - lam
    w[i, i1] += lam
  return w


def resize_grid(table, src: int, dst: int):
  """table [1, src*src, D] (row-major grid) -> [1, dst*dst, D], bilinear as PyTorch."""
  if src == dst:
    return table
  m = jnp.asarray(bilinear_resize_matrix(src, dst), jnp.float32)
  g = jnp.asarray(table, jnp.float32).reshape(src, src, -1)
  out = jnp.einsum('ia,jb,abd->ijd', m, m, g, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, dst * dst, -1).astype(table.dtype)


def at_image_size(model: Harmon, image_size: int | None = None) -> Harmon:
  """A run-time copy of `model` (checkpoint shapes) whose MAR pos-embeds are resized to the
  grid of `image_size` (default `config.image_size`); every other parameter is shared."""
  import dataclasses

  cfg = model.config
  if image_size is not None:
    cfg = dataclasses.replace(cfg, image_size=int(image_size))
  src, nb = cfg.mar.seq_h, cfg.mar.buffer_size
  dst = cfg.runtime_mar.seq_h
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0),
                                                               runtime=True)))
  old = dict((tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model)))
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    value = old[tuple(path)][...]
    name = path[-1]
    if path[0] == 'mar' and name in ('encoder_pos_embed_learned', 'decoder_pos_embed_learned'):
      value = jnp.concatenate([value[:, :nb], resize_grid(value[:, nb:], src, dst)], axis=1)
    elif path[0] == 'mar' and name == 'diffusion_pos_embed_learned':
      value = resize_grid(value, src, dst)
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_harmon(config: HarmonConfig, seed: int = 0, *, runtime: bool = False) -> Harmon:
  return Harmon(config, rngs=nnx.Rngs(seed), runtime=runtime)
