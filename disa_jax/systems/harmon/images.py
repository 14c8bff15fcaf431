"""Token latents -> images as Harmon does (wusize/Harmon `Harmon.decode`, scripts/text2image.py).

  latent = unpatchify(tokens) / 0.2325                 [B, m, n, 16] (patch size 1)
  x      = KL-16 decode(latent)                        [B, 16m, 16n, 3], ~[-1, 1]
  pixels = uint8(clamp(127.5 x + 128, 0, 255))         truncation toward zero, not rounding
                                                       (MAR rounds (x + 1) / 2 * 255 instead)
Only the conditional rows are decoded (the official code decodes all rows, then drops half).
The arithmetic is fp32 here (the official scripts run it in bf16).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from disa_jax.systems.harmon.config import VAE_SCALE


def to_uint8(images) -> np.ndarray:
  """Official post-processing of decoder output in ~[-1, 1] -> uint8 (truncating cast)."""
  x = jnp.clip(127.5 * jnp.asarray(images, jnp.float32) + 128.0, 0.0, 255.0)
  return np.asarray(x).astype(np.uint8)


def tokens_to_latent(tokens, grid: int):
  """tokens [B, L, C] (row-major grid) -> unscaled VAE latent [B, grid, grid, C]."""
  tokens = jnp.asarray(tokens, jnp.float32)
  b, _, c = tokens.shape
  return tokens.reshape(b, grid, grid, c) / VAE_SCALE


def decode_images(vae, tokens, grid: int) -> np.ndarray:
  """uint8 images [B, 16 grid, 16 grid, 3] from token latents with a KL-16 `AutoencoderKL`."""
  return to_uint8(vae.decode(tokens_to_latent(tokens, grid)))


def grid_image(images: np.ndarray, columns: int) -> np.ndarray:
  """Tiles uint8 images [N, H, W, 3] row by row into one [rows H, columns W, 3] image."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  out = np.zeros((rows * h, columns * w, c), np.uint8)
  for i in range(n):
    r, k = divmod(i, columns)
    out[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
  return out
