"""KL-16 VAE: the LDM `AutoencoderKL` MAR uses as its tokenizer (LTH14/mar models/vae.py).

NHWC throughout. Module names mirror the official state dict (`encoder.down.{i}.block.{j}
.norm1`, `encoder.down.4.attn.{j}.q`, `decoder.up.{i}.upsample.conv`, `decoder.mid.attn_1`,
`quant_conv`, `post_quant_conv`, ...), so converting official weights is a mechanical rename
(`disa_jax.convert.mapping`: Conv2d OIHW -> HWIO, GroupNorm weight -> scale).

  encode: conv_in -> per level i: num_res_blocks x (ResnetBlock [-> AttnBlock if i in
          attn_levels]) -> Downsample (i < last: pad right/bottom 1, 3x3 conv stride 2)
          -> mid (ResnetBlock, AttnBlock, ResnetBlock) -> GroupNorm -> swish -> conv_out
          -> quant_conv -> (mean, logvar clamped to [-30, 20])
  decode: post_quant_conv -> conv_in -> mid -> levels i = last..0: (num_res_blocks + 1) x
          ResnetBlock -> Upsample (i > 0: nearest x2, 3x3 conv) -> GroupNorm -> swish -> conv_out

`decoder.up` is stored in resolution order (`up.0` is the full-resolution level) although it
runs from the last level to `up.0`, as in the official code. The decoder has no attention
outside `mid`. GroupNorm: 32 groups, eps 1e-6, two-pass variance (as torch), float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an LDM AutoencoderKL; the defaults are MAR's KL-16 (66.5M parameters).

  `attn_levels` are the encoder levels with attention blocks (the official
  `attn_resolutions=(16,)` at resolution 256 is level 4). The latent grid is the image size
  divided by `2 ** (len(ch_mult) - 1)` (16 for KL-16).
  """

  embed_dim: int = 16
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_levels: tuple[int, ...] = (4,)
  in_channels: int = 3
  out_ch: int = 3
  num_groups: int = 32
  dtype: str = 'float32'

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_levels', tuple(int(i) for i in self.attn_levels))
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
    if not self.ch_mult:
      raise ValueError('ch_mult must have at least one level')
    for c in {self.ch * m for m in (1, *self.ch_mult)}:
      if c % self.num_groups:
        raise ValueError(f'{c} channels are not divisible into {self.num_groups} groups')
    bad = [i for i in self.attn_levels if not 0 <= i < len(self.ch_mult)]
    if bad:
      raise ValueError(f'attn_levels {bad} out of range for {len(self.ch_mult)} levels')

  @classmethod
  def from_dict(cls, d: Any) -> VAEConfig:
    """From a mapping (e.g. model_config.json); unknown keys are an error naming them."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown VAE config keys {unknown}; known keys: {sorted(names)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


def swish(x):
  return x * jax.nn.sigmoid(x)


def _conv(cin, cout, k, *, rngs, dtype, strides=1, padding=None):
  pad = k // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=strides, padding=pad, dtype=dtype, rngs=rngs)


def _norm(c, cfg: VAEConfig, rngs):
  return nnx.GroupNorm(c, num_groups=cfg.num_groups, epsilon=1e-6, use_fast_variance=False,
                       dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
  """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), 1x1 `nin_shortcut` if channels change."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    self.norm1 = _norm(cin, cfg, rngs)
    self.conv1 = _conv(cin, cout, 3, dtype=dt, rngs=rngs)
    self.norm2 = _norm(cout, cfg, rngs)
    self.conv2 = _conv(cout, cout, 3, dtype=dt, rngs=rngs)
    self.nin_shortcut = _conv(cin, cout, 1, dtype=dt, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x.astype(jnp.float32) + h.astype(jnp.float32)


class AttnBlock(nnx.Module):
  """Single-head self-attention over the H*W positions (1x1 conv q, k, v, proj_out), residual."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    self.norm = _norm(c, cfg, rngs)
    self.q = _conv(c, c, 1, dtype=dt, rngs=rngs)
    self.k = _conv(c, c, 1, dtype=dt, rngs=rngs)
    self.v = _conv(c, c, 1, dtype=dt, rngs=rngs)
    self.proj_out = _conv(c, c, 1, dtype=dt, rngs=rngs)

  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = self.norm(x)
    q, k, v = (f(h).reshape(b, hh * ww, c) for f in (self.q, self.k, self.v))
    w = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
    o = jnp.einsum('bij,bjc->bic', w, v).reshape(b, hh, ww, c)
    return x + self.proj_out(o).astype(jnp.float32)


class Downsample(nnx.Module):
  """Zero-pad right and bottom by 1, then a 3x3 conv with stride 2 (LDM's asymmetric pad)."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    self.conv = _conv(c, c, 3, strides=2, padding=((0, 1), (0, 1)), dtype=dt, rngs=rngs)

  def __call__(self, x):
    return self.conv(x).astype(jnp.float32)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    self.conv = _conv(c, c, 3, dtype=dt, rngs=rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x).astype(jnp.float32)


class Level(nnx.Module):
  """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, possibly empty) and a
  `downsample` (encoder) or `upsample` (decoder) at all but the last/first level."""

  def __init__(self, cin: int, cout: int, n_blocks: int, *, attn: bool, resample: str | None,
               cfg: VAEConfig, rngs: nnx.Rngs):
    self.block = nnx.List(
      [ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs) for j in range(n_blocks)])
    self.attn = nnx.List([AttnBlock(cout, cfg, rngs=rngs) for _ in range(n_blocks if attn else 0)])
    if resample == 'down':
      self.downsample = Downsample(cout, cfg, rngs=rngs)
    elif resample == 'up':
      self.upsample = Upsample(cout, cfg, rngs=rngs)

  def __call__(self, x):
    for j, blk in enumerate(self.block):
      x = blk(x)
      if len(self.attn):
        x = self.attn[j](x)
    if hasattr(self, 'downsample'):
      x = self.downsample(x)
    if hasattr(self, 'upsample'):
      x = self.upsample(x)
    return x


class Mid(nnx.Module):
  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(c, c, cfg, rngs=rngs)
    self.attn_1 = AttnBlock(c, cfg, rngs=rngs)
    self.block_2 = ResnetBlock(c, c, cfg, rngs=rngs)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
  """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * embed_dim] (before quant_conv)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    n = len(cfg.ch_mult)
    chans = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, dtype=dt, rngs=rngs)
    self.down = nnx.List([
      Level(cfg.ch if i == 0 else chans[i - 1], chans[i], cfg.num_res_blocks,
            attn=i in cfg.attn_levels, resample='down' if i < n - 1 else None, cfg=cfg,
            rngs=rngs)
      for i in range(n)])
    self.mid = Mid(chans[-1], cfg, rngs=rngs)
    self.norm_out = _norm(chans[-1], cfg, rngs)
    self.conv_out = _conv(chans[-1], 2 * cfg.embed_dim, 3, dtype=dt, rngs=rngs)

  def __call__(self, x):
    h = self.conv_in(x).astype(jnp.float32)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(swish(self.norm_out(h))).astype(jnp.float32)


class Decoder(nnx.Module):
  """Latent [B, h, w, embed_dim] (after post_quant_conv) -> images [B, h*f, w*f, out_ch]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    n = len(cfg.ch_mult)
    chans = [cfg.ch * m for m in cfg.ch_mult]
    self.conv_in = _conv(cfg.embed_dim, chans[-1], 3, dtype=dt, rngs=rngs)
    self.mid = Mid(chans[-1], cfg, rngs=rngs)
    # up[i] takes the channels of level i + 1 (the previous one executed) to chans[i].
    self.up = nnx.List([
      Level(chans[min(i + 1, n - 1)], chans[i], cfg.num_res_blocks + 1, attn=False,
            resample='up' if i > 0 else None, cfg=cfg, rngs=rngs)
      for i in range(n)])
    self.norm_out = _norm(chans[0], cfg, rngs)
    self.conv_out = _conv(chans[0], cfg.out_ch, 3, dtype=dt, rngs=rngs)

  def __call__(self, z):
    h = self.mid(self.conv_in(z).astype(jnp.float32))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(swish(self.norm_out(h))).astype(jnp.float32)


class AutoencoderKL(nnx.Module):
  """The KL-16 VAE. `encode(images) -> (mean, logvar)`, `decode(latent) -> images`."""

  def __init__(self, config: VAEConfig | None = None, *, rngs: nnx.Rngs):
    cfg = config or VAEConfig()
    self.config = cfg
    dt = None if cfg.dtype == 'float32' else cfg.compute_dtype
    z = cfg.embed_dim
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = _conv(2 * z, 2 * z, 1, dtype=dt, rngs=rngs)
    self.post_quant_conv = _conv(z, z, 1, dtype=dt, rngs=rngs)

  def encode(self, images):
    """images [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/16, W/16, embed_dim].

    The parameters of the official `DiagonalGaussianDistribution` (logvar clamped to
    [-30, 20]); a posterior sample is `mean + exp(logvar / 2) * noise`.
    """
    moments = self.quant_conv(self.encoder(jnp.asarray(images, jnp.float32)))
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latent):
    """latent [B, h, w, embed_dim] (unscaled VAE latent) -> images [B, 16h, 16w, 3], ~[-1, 1]."""
    z = self.post_quant_conv(jnp.asarray(latent, jnp.float32))
    return self.decoder(z)
