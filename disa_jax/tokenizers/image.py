"""From sampled tokens to images: the KL-16 VAE, an identity pixel tokenizer, or none.

- `kl16`: latent = unpatchify(tokens) / 0.2325 -> VAE decoder -> [-1, 1] -> uint8 exactly as
  the official `engine_mar.py` ((x + 1) / 2 * 255, clip, round half to even).
- `pixels`: tokens are image patches themselves (the bundled digits model): pixel values
  x = unpatchify(tokens) / scale in [-1, 1], mapped to uint8 the same way.
- `none`: no decoder; `token_preview` renders the first latent channels for a grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from disa_jax.systems.mar.model import MARConfig, unpatchify


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images -> uint8 as the official code (np.round is half to even)."""
  x = np.asarray(images, np.float32)
  return np.round(np.clip((x + 1) / 2 * 255, 0, 255)).astype(np.uint8)


class PixelTokenizer:
  """Tokens are (scaled) pixel patches; 1 or 3 channels."""

  def __init__(self, config: MARConfig, scale: float = 1.0):
    self.config, self.scale = config, scale

  def decode(self, tokens) -> np.ndarray:
    c = self.config
    x = unpatchify(jnp.asarray(tokens), c.patch_size, c.seq_h, c.vae_embed_dim) / self.scale
    img = to_uint8(x)
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    return img

  def encode(self, images_uint8) -> np.ndarray:
    from disa_jax.systems.mar.model import patchify

    x = np.asarray(images_uint8, np.float32) / 255.0 * 2 - 1
    if x.ndim == 3:
      x = x[..., None]
    return np.asarray(patchify(jnp.asarray(x), self.config.patch_size)) * self.scale


class VAETokenizer:
  """KL-16 VAE decoder (`disa_jax.tokenizers.kl16.AutoencoderKL`), jitted once per batch size.

  The batch is split over `devices` (default: this process's local devices) and decoded in
  chunks of at most `max_per_device` images per device (a 256x256 decode holds several
  [n, 256, 256, 128] float32 activations, ~34 MB per image each); the last chunk is padded
  so one batch size compiles once. Parameters are replicated. `matmul_precision`
  ('highest' for parity runs, None for the backend default) applies to convs and attention.
  """

  def __init__(self, config: MARConfig, vae, scale: float = 0.2325, *,
               matmul_precision: str | None = None, devices=None, max_per_device: int = 32):
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    vc = vae.config
    if vc.embed_dim != config.vae_embed_dim or vc.downsample_factor != config.vae_stride:
      from disa_jax.checkpoint import CheckpointError

      raise CheckpointError(
        f'the VAE (latent channels {vc.embed_dim}, downsampling {vc.downsample_factor}) does '
        f'not fit the MAR model (vae_embed_dim {config.vae_embed_dim}, vae_stride '
        f'{config.vae_stride}); pass the VAE the model was trained with')
    self.config, self.scale = config, scale
    self.matmul_precision = matmul_precision or None
    self.max_per_device = max(1, int(max_per_device))
    self.devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(self.devices), ('data',))
    replicated = NamedSharding(mesh, PartitionSpec())
    self._batch = NamedSharding(mesh, PartitionSpec('data'))
    self.graphdef, state = nnx.split(vae)
    self.state = jax.device_put(state, replicated)
    self._decode = jax.jit(self._decode_impl, in_shardings=(replicated, self._batch),
                           out_shardings=self._batch)

  def _decode_impl(self, state, tokens):
    from flax import nnx

    vae = nnx.merge(self.graphdef, state)
    c = self.config
    latent = unpatchify(tokens, c.patch_size, c.seq_h, c.vae_embed_dim) / self.scale
    return vae.decode(latent)

  def decode_float(self, tokens) -> np.ndarray:
    """tokens [B, L, C] -> float32 images [B, H, W, 3] in ~[-1, 1] (before uint8 mapping)."""
    tokens = np.asarray(tokens, np.float32)
    n, k = len(tokens), len(self.devices)
    rows = k * min(self.max_per_device, -(-n // k))          # images per decode call
    pad = -n % rows
    if pad:
      tokens = np.concatenate([tokens, np.zeros((pad, *tokens.shape[1:]), np.float32)])
    outs = []
    for lo in range(0, len(tokens), rows):
      x = jax.device_put(tokens[lo:lo + rows], self._batch)
      if self.matmul_precision:
        with jax.default_matmul_precision(self.matmul_precision):
          outs.append(self._decode(self.state, x))
      else:
        outs.append(self._decode(self.state, x))
    return np.concatenate([np.asarray(o) for o in outs])[:n]

  def decode(self, tokens) -> np.ndarray:
    """tokens [B, L, C] -> uint8 images [B, H, W, 3] (the official mapping)."""
    return to_uint8(self.decode_float(tokens))


def token_preview(config: MARConfig, tokens, size: int = 64) -> np.ndarray:
  """uint8 [B, size, size, 3]: first three token channels on the latent grid, per-image
  min-max normalised (a look at raw latents when no decoder is available)."""
  c = config
  lat = np.asarray(unpatchify(jnp.asarray(tokens), c.patch_size, c.seq_h, c.vae_embed_dim))
  lat = lat[..., :3] if lat.shape[-1] >= 3 else np.repeat(lat[..., :1], 3, axis=-1)
  lo = lat.min(axis=(1, 2, 3), keepdims=True)
  hi = lat.max(axis=(1, 2, 3), keepdims=True)
  img = ((lat - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)
  rep = max(1, size // img.shape[1])
  return img.repeat(rep, axis=1).repeat(rep, axis=2)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 grid image."""
  n, h, w, ch = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, ch), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid
