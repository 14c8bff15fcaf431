"""D-AR's sequential diffusion tokenizer ("tokenizer v1"): image <-> 256 ids in 8 groups of 32.

Matches tokenizer/tokenizer_image/{vq_model,diff_decoder}.py of showlab/D-AR @ 3fb0f2d.
Shapes (official sizes): B batch, images NHWC (B, 256, 256, 3) in [-1, 1], D = 768,
N = 256 queries = G (8) groups x Q (32) ids, codebook 16384 x 8.

  encode:   P = LN(patchify(x)) (B, 256, D);  Q = query_linear(query_table[:N])
            8 blocks over [P ; Q] (patches see patches, query i sees patches and queries <= i,
            2-D RoPE on patches, identity on queries) -> LN(last N) -> quant_in (D -> 8)
            ids = argmin_j |z^ - e^_j|^2 with z^, e^_j l2-normalised          (B, N) int32
  conditions(ids): quant_out(e^_ids) + position table -> 8 causal blocks -> LN   (B, N, D)
  velocity(x, t', c_g): 12 SiT blocks on 8x8 pixel patches (1024 tokens), cross-attending to
            the 32 vectors c_g of one group                                   (B, H, W, 3)
  decode:   flow t = 0 noise -> 1 data (data scaled by 0.6), S steps at u_i = i/S shifted by
            t' = u / (u + 2 (1 - u)), step i reads group round(8 u_i) (clamped), first step
            Euler, then x += h_i (1.5 v_i - 0.5 v_{i-1}); image = x / 0.6.
  clip_steps k: the first k grid points, then one jump to t' = 1 (the official previews).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.layers import (
  HEAD_DIM,
  SiTBlock,
  TransformerBlock,
  dense,
  plain_norm,
  rope_2d_table,
)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Architecture and flow settings of the tokenizer (defaults: configs/tokenizer_v1.yaml)."""
  image_size: int = 256
  patch_size: int = 16            # encoder patchify
  width: int = 768                # encoder and token-decoder width
  encoder_layers: int = 8
  decoder_layers: int = 8
  num_queries: int = 256
  num_groups: int = 8
  queries_per_group: int = 32
  num_steps: int = 8              # denoising steps of the official decode
  table_size: int = 1024          # rows of query_embedding / decoder_embedding
  query_rank: int = 8             # query_embedding width (query_low_rank)
  vq_dim: int = 8
  codebook_size: int = 16384
  flow_width: int = 768
  flow_depth: int = 12
  flow_patch: int = 8
  data_std: float = 0.6
  time_shift: float = 2.0
  rope_theta: float = 10000.0

  def __post_init__(self):
    problems = []
    for name in ('width', 'flow_width'):
      if getattr(self, name) % HEAD_DIM:
        problems.append(f'{name} {getattr(self, name)} is not a multiple of {HEAD_DIM}')
    if self.image_size % self.patch_size or self.image_size % self.flow_patch:
      problems.append(f'image_size {self.image_size} is not a multiple of the patch sizes')
    if self.num_queries != self.num_groups * self.queries_per_group:
      problems.append(f'num_queries {self.num_queries} != num_groups x queries_per_group')
    if self.num_queries > self.table_size:
      problems.append(f'num_queries {self.num_queries} > table_size {self.table_size}')
    if problems:
      raise UserError('invalid D-AR tokenizer config: ' + '; '.join(problems))

  @classmethod
  def from_dict(cls, d: dict) -> TokenizerConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise UserError(f'unknown D-AR tokenizer config fields: {", ".join(unknown)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class PixelFlowNet(nnx.Module):
  """DiffusionCore: velocity v(x, t', c) of the pixel flow (mlp_head false, no REPA branch)."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.flow_width, cfg.flow_patch
    self.cond_mlp = dense(cfg.width, d, rngs=rngs)
    self.conv_in = dense(3 * p * p, d, rngs=rngs)
    self.conv_out = dense(d, 3 * p * p, rngs=rngs)
    self.blocks = nnx.List([SiTBlock(d, rngs=rngs) for _ in range(cfg.flow_depth)])

  def __call__(self, x, t, cond):
    """x (B, H, W, 3) flow state, t (B,) shifted time, cond (B, Q, width) -> velocity."""
    p = self.cfg.flow_patch
    b, h, w, c = x.shape
    tokens = patchify(x, p)
    cond = plain_norm(self.cond_mlp(cond))
    rope = tuple(jnp.asarray(a) for a in rope_2d_table(h // p, w // p, self.cfg.rope_theta))
    z = self.conv_in(tokens)
    for block in self.blocks:
      z = block(z, cond, t, rope)
    z = self.conv_out(plain_norm(z))
    return unpatchify(z, p, h // p, w // p, c)


def patchify(x, p: int):
  """(B, H, W, C) -> (B, (H/p)(W/p), C p p), features in (channel, row, column) order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(z, p: int, gh: int, gw: int, c: int = 3):
  b = z.shape[0]
  z = z.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
  return z.reshape(b, gh * p, gw * p, c)


class Tokenizer(nnx.Module):
  """VQModel: encoder (images -> ids), token decoder (ids -> conditions), pixel flow decoder."""

  def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.width
    self.patchify = dense(3 * cfg.patch_size ** 2, d, rngs=rngs)
    self.encoder_layers = nnx.List([TransformerBlock(d, rngs=rngs)
                                    for _ in range(cfg.encoder_layers)])
    self.decoder_layers = nnx.List([TransformerBlock(d, rngs=rngs)
                                    for _ in range(cfg.decoder_layers)])
    self.query_embedding = nnx.Param(
      jax.random.normal(rngs.params(), (cfg.table_size, cfg.query_rank), jnp.float32))
    self.query_linear = dense(cfg.query_rank, d, rngs=rngs)
    self.quant_in_conv = dense(d, cfg.vq_dim, rngs=rngs, bias=False)
    self.quant_out_conv = dense(cfg.vq_dim, d, rngs=rngs, bias=False)
    self.codebook = nnx.Param(
      jax.random.normal(rngs.params(), (cfg.codebook_size, cfg.vq_dim), jnp.float32))
    self.decoder_embedding = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (cfg.table_size, d), jnp.float32))
    self.flow = PixelFlowNet(cfg, rngs=rngs)

  # ------------------------------------------------------------------------------ encoder + VQ
  def encode_latents(self, images):
    """images (B, H, W, 3) in [-1, 1] -> pre-quantisation z (B, N, vq_dim)."""
    cfg = self.cfg
    gh, gw = images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size
    n_p, n_q = gh * gw, cfg.num_queries
    patches = plain_norm(self.patchify(patchify(images, cfg.patch_size)))
    queries = self.query_linear(self.query_embedding[...][:n_q])
    tokens = jnp.concatenate(
      [patches, jnp.broadcast_to(queries, (images.shape[0], n_q, cfg.width))], axis=1)
    cos, sin = rope_2d_table(gh, gw, cfg.rope_theta)
    rope = (jnp.asarray(np.concatenate([cos, np.ones((n_q, cos.shape[1]), np.float32)])),
            jnp.asarray(np.concatenate([sin, np.zeros((n_q, sin.shape[1]), np.float32)])))
    n = n_p + n_q
    mask = np.tril(np.ones((n, n), bool))
    mask[:, :n_p] = True
    mask[:n_p, n_p:] = False
    mask = jnp.asarray(mask)
    for layer in self.encoder_layers:
      tokens = layer(tokens, mask=mask, rope=rope)
    return self.quant_in_conv(plain_norm(tokens[:, n_p:]))

  def quantize(self, z):
    """Nearest l2-normalised codebook row of each l2-normalised z: (B, N, vq) -> (B, N) int32,
    by argmin of |z|^2 + |e|^2 - 2 z.e as the official VectorQuantizer."""
    z = l2_normalize(z)
    e = l2_normalize(self.codebook[...])
    d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)
         - 2.0 * jnp.einsum('bnd,kd->bnk', z, e))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def encode(self, images):
    """images (B, H, W, 3) in [-1, 1] -> ids (B, N) int32."""
    return self.quantize(self.encode_latents(images))

  # ---------------------------------------------------------------------------- token decoder
  def conditions(self, ids):
    """ids (B, N) -> decoder conditions (B, N, width); row j depends on ids[:, :j+1] only."""
    n = ids.shape[1]
    if n != self.cfg.num_queries:
      raise UserError(f'the token decoder takes exactly {self.cfg.num_queries} ids per image, '
                      f'got {n}; pad a prefix with any ids (conditions are causal)')
    q = l2_normalize(self.codebook[...])[ids]
    h = self.quant_out_conv(q) + self.decoder_embedding[...][:n]
    mask = jnp.asarray(np.tril(np.ones((n, n), bool)))
    for layer in self.decoder_layers:
      h = layer(h, mask=mask)
    return plain_norm(h)

  def velocity(self, x, t, cond_group):
    return self.flow(x, t, cond_group)


def l2_normalize(x, eps: float = 1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------ flow grid / AB2
@dataclasses.dataclass(frozen=True)
class FlowGrid:
  """The decoder's time grid: shifted times t'_0..t'_S (float32, as the official code computes
  them), step sizes h_i = t'_{i+1} - t'_i and the first query row of each step's group."""
  times: np.ndarray        # (S + 1,)  t'_i, last = 1
  steps: np.ndarray        # (S,)      h_i
  group_start: tuple       # (S,)      first query index of the group step i reads


def flow_grid(cfg: TokenizerConfig, *, num_steps: int | None = None,
              clip_steps: int | None = None) -> FlowGrid:
  """Grid of `decode_into_pixels`: u_i = i / S (i < S), truncated to `clip_steps` points, plus
  u = 1; t' = u / (u + shift (1 - u)) in float32; group of u: min(N - Q, floor(G u + 1/2) / G N)."""
  s = cfg.num_steps if num_steps is None else num_steps
  if s < 1:
    raise UserError(f'the decoder needs at least 1 step, got {s}')
  u = [i / s for i in range(s)]
  if clip_steps is not None:
    if not 1 <= clip_steps <= s:
      raise UserError(f'clip_steps must be in 1..{s}, got {clip_steps}')
    u = u[:clip_steps]
  starts = []
  for t in u:
    g = math.floor(t * cfg.num_groups + 0.5) / cfg.num_groups
    starts.append(min(cfg.num_queries - cfg.queries_per_group, int(g * cfg.num_queries)))
  t32 = np.asarray(u + [1.0], np.float32)
  shifted = t32 / (t32 + np.float32(cfg.time_shift) * (np.float32(1.0) - t32))
  return FlowGrid(times=shifted.astype(np.float32), steps=(shifted[1:] - shifted[:-1]),
                  group_start=tuple(starts))


def ab2_update(x, v, v_prev, h, t, first, data_std: float):
  """One Euler (first) / fixed-coefficient AB2 step and the preview it implies.

  d = v if first else 1.5 v - 0.5 v_prev;  x' = x + h d;  preview = (x + (1 - t) d) / std.
  """
  d = jnp.where(first, v, 1.5 * v - 0.5 * v_prev)
  return x + h * d, (x + (1.0 - t) * d) * (1.0 / data_std)
