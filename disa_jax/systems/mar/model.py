"""MAR: masked autoregressive transformer with a per-token diffusion head (LTH14/mar models/mar.py).

Token layout: tokens [B, L, C] with L = (img_size / vae_stride / patch_size)^2 in row-major
order and C = vae_embed_dim * patch_size^2. The encoder sequence is `buffer_size` (64) class
positions followed by the L token positions; every buffer position carries the same class
vector (`class_emb[label]`, or `fake_latent` for the unconditional branch).

Encoder:  z_proj(tokens) -> buffer <- class vector -> + encoder_pos_embed -> z_proj_ln
          -> keep buffer + visible tokens -> encoder_blocks -> encoder_norm
Decoder:  decoder_embed -> scatter into [B, 64+L] filled with mask_token -> + decoder_pos_embed
          -> decoder_blocks -> decoder_norm -> drop buffer -> + diffusion_pos_embed  => z [B, L, Dd]

Masked tokens are *dropped* from the encoder, as in the official code. With static shapes this
is `encode(tokens at visible positions, positions, valid)`: the caller gathers the visible
tokens (padded to a bucket length, padding excluded as attention keys). `forward_mae_encoder`
and `forward_mae_decoder` keep the official dense signatures (all L positions, masked ones
excluded as keys), which is numerically the same computation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from disa_jax.heads.mlp_adaln import DiffLoss
from disa_jax.layers.basic import layer_norm, linear, normal_002, split_key
from disa_jax.layers.vit import Block

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# The one list of MARConfig fields that are not architecture (a model directory loads under
# any value of them; `checkpoint.architecture_diff` skips them):
COMPUTE_FIELDS = ('dtype', 'attn_splits')          # how the compute runs (`config.model.*`)
RESULT_NEUTRAL_FIELDS = ('attn_splits',)           # of those, the ones that change no number
TRAINING_FIELDS = ('label_drop_prob', 'attn_dropout', 'proj_dropout', 'mask_ratio_min',
                   'diffusion_batch_mul')          # used only by the training loss
NON_ARCHITECTURE_FIELDS = COMPUTE_FIELDS + TRAINING_FIELDS


def decoder_slots(positions, valid, nb: int, seq: int):
  """Decoder slots [B, nb+V] of the buffer rows and of the token rows at positions [B, V]
  (rows with valid False -> nb + seq, i.e. none)."""
  b = positions.shape[0]
  tok = jnp.where(valid, nb + positions, nb + seq)
  return jnp.concatenate([jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, nb)), tok], 1)


def inverse_slots(slots, n_all: int):
  """For slots [B, n] (slot >= n_all: none) -> inv [B, n_all]: the row filling each slot, -1
  where none does. Placing rows is then a gather (`fill_rows`): only int32 indices are
  scattered, which XLA runs much faster on CPU than a scatter of full rows."""
  rows = jnp.broadcast_to(jnp.arange(slots.shape[1], dtype=jnp.int32), slots.shape)
  return jax.vmap(lambda s, r: jnp.full((n_all,), -1, jnp.int32).at[s].set(r, mode='drop'))(
    slots, rows)


def fill_rows(rows, inv, fill):
  """[B, n_all, ...]: rows [B, n, ...] placed by inv (`inverse_slots`), `fill` elsewhere."""
  got = jnp.take_along_axis(rows, jnp.maximum(inv, 0).reshape(inv.shape + (1,) * (rows.ndim - 2)),
                            axis=1)
  return jnp.where((inv >= 0).reshape(inv.shape + (1,) * (rows.ndim - 2)), got,
                   jnp.asarray(fill, rows.dtype))


@dataclasses.dataclass(frozen=True)
class MARConfig:
  """Architecture of a MAR model (official names; defaults are the fixed MAR settings)."""

  encoder_embed_dim: int = 768
  encoder_depth: int = 12
  encoder_num_heads: int = 12
  decoder_embed_dim: int = 768
  decoder_depth: int = 12
  decoder_num_heads: int = 12
  diffloss_d: int = 6
  diffloss_w: int = 1024
  img_size: int = 256
  vae_stride: int = 16
  patch_size: int = 1
  vae_embed_dim: int = 16
  mlp_ratio: float = 4.0
  buffer_size: int = 64
  class_num: int = 1000
  label_drop_prob: float = 0.1
  attn_dropout: float = 0.1
  proj_dropout: float = 0.1
  mask_ratio_min: float = 0.7
  diffusion_batch_mul: int = 4
  dtype: str = 'float32'
  attn_splits: int = 0  # head groups per attention call; 0 = auto (CPU cores on CPU, else 1)

  def __post_init__(self):
    grid = self.img_size // self.vae_stride
    if self.img_size % self.vae_stride or grid % self.patch_size:
      raise ValueError(
        f'img_size {self.img_size} must be divisible by vae_stride {self.vae_stride} and the '
        f'latent grid {grid} by patch_size {self.patch_size}'
      )
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
    for name in ('encoder', 'decoder'):
      dim, heads = getattr(self, f'{name}_embed_dim'), getattr(self, f'{name}_num_heads')
      if dim % heads:
        raise ValueError(f'{name}_embed_dim {dim} is not divisible by {heads} heads')

  @classmethod
  def from_dict(cls, d: Any) -> MARConfig:
    """From a mapping / ConfigDict; unknown keys are an error naming them."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown model config keys {unknown}; known keys: {sorted(names)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def seq_h(self) -> int:
    return self.img_size // self.vae_stride // self.patch_size

  @property
  def seq_len(self) -> int:
    return self.seq_h**2

  @property
  def token_embed_dim(self) -> int:
    return self.vae_embed_dim * self.patch_size**2

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


class MAR(nnx.Module):
  """The MAR transformer + DiffLoss head. Attribute names mirror the official state dict."""

  def __init__(self, config: MARConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    dt = None if c.dtype == 'float32' else c.compute_dtype
    d, dd, nb, seq = c.encoder_embed_dim, c.decoder_embed_dim, c.buffer_size, c.seq_len
    init = lambda shape: nnx.Param(normal_002(rngs.params(), shape, jnp.float32))  # noqa: E731

    self.fake_latent = init((1, d))
    self.encoder_pos_embed_learned = init((1, seq + nb, d))
    self.mask_token = init((1, 1, dd))
    self.decoder_pos_embed_learned = init((1, seq + nb, dd))
    self.diffusion_pos_embed_learned = init((1, seq, dd))
    self.class_emb = nnx.Embed(c.class_num, d, embedding_init=normal_002, rngs=rngs)

    self.z_proj = linear(c.token_embed_dim, d, dtype=dt, rngs=rngs)
    self.z_proj_ln = layer_norm(d, rngs=rngs)
    block = lambda dim, heads: Block(  # noqa: E731
      dim, heads, c.mlp_ratio, attn_drop=c.attn_dropout, proj_drop=c.proj_dropout, dtype=dt,
      attn_splits=c.attn_splits, rngs=rngs)
    self.encoder_blocks = nnx.List(
      [block(d, c.encoder_num_heads) for _ in range(c.encoder_depth)])
    self.encoder_norm = layer_norm(d, rngs=rngs)
    self.decoder_embed = linear(d, dd, dtype=dt, rngs=rngs)
    self.decoder_blocks = nnx.List(
      [block(dd, c.decoder_num_heads) for _ in range(c.decoder_depth)])
    self.decoder_norm = layer_norm(dd, rngs=rngs)
    self.diffloss = DiffLoss(c.token_embed_dim, dd, c.diffloss_d, c.diffloss_w, dtype=dt,
                             rngs=rngs)

  # ----------------------------------------------------------------------------------------
  # Class conditioning
  def class_embedding(self, labels):
    """[B, D] class vectors; label -1 (or `labels=None`) selects the unconditional `fake_latent`."""
    if labels is None:
      raise ValueError('use fake_latent directly for unconditional rows')
    labels = jnp.asarray(labels)
    table = self.class_emb.embedding[...]
    emb = table[jnp.clip(labels, 0, self.config.class_num - 1)]
    return jnp.where((labels < 0)[:, None], self.fake_latent[...], emb)

  # ----------------------------------------------------------------------------------------
  # Encoder / decoder on gathered (visible) tokens
  def encode(self, tokens, positions, class_embedding, *, valid=None, dropout_key=None):
    """Encoder on the visible tokens only.

    tokens [B, V, C] at `positions` [B, V] (ints in [0, L)); `valid` [B, V] marks real entries
    (padding is excluded as an attention key); class_embedding [B, D].
    Returns [B, buffer + V, D], buffer positions first.
    """
    nb = self.config.buffer_size
    pos = self.encoder_pos_embed_learned[...][0]
    x = self.z_proj(tokens).astype(jnp.float32) + pos[nb + positions]
    buf = class_embedding[:, None, :].astype(jnp.float32) + pos[:nb]
    x = self.z_proj_ln(jnp.concatenate([buf, x], axis=1))
    key_mask = None
    if valid is not None:
      key_mask = jnp.concatenate([jnp.ones(valid.shape[:1] + (nb,), bool), valid], axis=1)
    keys = split_key(dropout_key, len(self.encoder_blocks))
    for blk, k in zip(self.encoder_blocks, keys, strict=True):
      x = blk(x, key_mask=key_mask, dropout_key=k)
    return self.encoder_norm(x)

  def decoder_input(self, x, inv):
    """decoder_embed(x) [B, nb+V, Dd] placed at the decoder slots by inv [B, nb+L]
    (`inverse_slots`), mask_token at the others, + decoder pos embed -> [B, nb+L, Dd]."""
    y = fill_rows(self.decoder_embed(x).astype(jnp.float32), inv,
                  self.mask_token[...][0].astype(jnp.float32))
    return y + self.decoder_pos_embed_learned[...]

  def decode(self, x, positions, *, valid=None, query_positions=None, dropout_key=None):
    """Decoder from the encoder output of buffer + tokens at `positions` [B, V].

    Every other token position gets `mask_token`. Returns z [B, L, Dd], or only the rows at
    `query_positions` [B, n] (the last block then runs its queries only there).
    """
    c = self.config
    nb, seq = c.buffer_size, c.seq_len
    b, v = positions.shape
    if valid is None:
      valid = jnp.ones((b, v), bool)
    h = self.decoder_input(x, inverse_slots(decoder_slots(positions, valid, nb, seq), nb + seq))
    keys = split_key(dropout_key, len(self.decoder_blocks))
    for blk, k in zip(self.decoder_blocks[:-1], keys[:-1], strict=True):
      h = blk(h, dropout_key=k)
    diff_pos = self.diffusion_pos_embed_learned[...][0]
    if query_positions is None:
      h = self.decoder_blocks[-1](h, dropout_key=keys[-1])
      return self.decoder_norm(h[:, nb:]) + diff_pos
    h = self.decoder_blocks[-1](h, query_index=nb + query_positions, dropout_key=keys[-1])
    return self.decoder_norm(h) + diff_pos[query_positions]

  # ----------------------------------------------------------------------------------------
  # Official dense API
  def forward_mae_encoder(self, tokens, mask, class_embedding):
    """Official signature: tokens [B, L, C], mask [B, L] (1 = unknown), class_embedding [B, D].

    Returns [B, buffer + L, D]; rows at masked positions are not meaningful (the official code
    drops them; here they are computed but never attended to nor read by the decoder).
    """
    b, seq = mask.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (b, seq))
    return self.encode(tokens, positions, class_embedding, valid=jnp.asarray(mask) == 0)

  def forward_mae_decoder(self, x, mask):
    """Official signature: encoder output [B, buffer + L, D] and mask [B, L] -> z [B, L, Dd]."""
    b, seq = mask.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (b, seq))
    return self.decode(x, positions, valid=jnp.asarray(mask) == 0)

  # ----------------------------------------------------------------------------------------
  def patchify(self, latent):
    """[B, H, W, C] latent (NHWC) -> tokens [B, L, C * p * p] (official channel order c, p, q)."""
    p = self.config.patch_size
    return patchify(latent, p)

  def unpatchify(self, tokens):
    """tokens [B, L, C * p * p] -> latent [B, H, W, C] (NHWC)."""
    c = self.config
    return unpatchify(tokens, c.patch_size, c.seq_h, c.vae_embed_dim)


def patchify(latent, p: int):
  """NHWC latent -> [B, (H/p)(W/p), C p p], features ordered (c, i, j) as the official einsum."""
  b, hh, ww, c = latent.shape
  x = latent.reshape(b, hh // p, p, ww // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # b h w c p q
  return x.reshape(b, (hh // p) * (ww // p), c * p * p)


def unpatchify(tokens, p: int, seq_h: int, channels: int):
  b = tokens.shape[0]
  x = tokens.reshape(b, seq_h, seq_h, channels, p, p)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # b h p w q c
  return x.reshape(b, seq_h * p, seq_h * p, channels)


def count_params(module) -> int:
  state = nnx.state(module, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
