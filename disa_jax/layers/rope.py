"""2-D rotary position embedding of FlowAR / xAR ("VisionRotaryEmbeddingFast", EVA-02 style).

Official: `FlowAR_DiSA/models/rope.py` (FlowAR re-scales per scale), `xAR_DiSA/models/rope.py`.

For head dim hd there are Q = hd/4 frequencies f_j = 1 / 10000^(2j / (hd/2)), j = 0..Q-1
(float32; the checkpoint stores them as `....rope.freqs`). A token at 2-D position (r, c) gets
per channel k of every head the angle
  k <  hd/2:  r * f[floor(k/2)]          (first half of the head: rows)
  k >= hd/2:  c * f[floor((k-hd/2)/2)]   (second half: columns)
and the rotation is applied to adjacent channel pairs (x_2i, x_2i+1):
  x'_2i = x_2i cos - x_2i+1 sin,   x'_2i+1 = x_2i+1 cos + x_2i sin.
FlowAR spreads every scale over the same 16x16 extent: a scale of side m (N = m^2 tokens,
row-major) has positions r = (l // m) * 16 / m, c = (l % m) * 16 / m (float32, as torch's
`arange(m) / m * 16`). Tables are built host-side in float32 numpy: shape (N, hd).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_freqs(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """The (head_dim/4,) float32 frequency vector (the checkpoint buffer `rope.freqs`)."""
  if head_dim % 4:
    raise ValueError(f'2-D RoPE needs a head dim divisible by 4, got {head_dim}')
  half = head_dim // 2
  expo = np.arange(0, half, 2)[: half // 2].astype(np.float32) / np.float32(half)
  return (np.float32(1.0) / np.power(np.float32(theta), expo, dtype=np.float32)).astype(np.float32)


def scale_positions(side: int, extent: int = 16) -> np.ndarray:
  """(side,) float32 coordinates i / side * extent of one axis of a FlowAR scale."""
  return (np.arange(side, dtype=np.float32) / np.float32(side) * np.float32(extent)
          ).astype(np.float32)


def rope_table(rows, cols, freqs) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (N, hd) float32, for tokens at positions (rows[l], cols[l])."""
  rows = np.asarray(rows, np.float32)
  cols = np.asarray(cols, np.float32)
  freqs = np.asarray(freqs, np.float32)
  ang_r = np.repeat((rows[:, None] * freqs[None, :]).astype(np.float32), 2, axis=-1)
  ang_c = np.repeat((cols[:, None] * freqs[None, :]).astype(np.float32), 2, axis=-1)
  ang = np.concatenate([ang_r, ang_c], axis=-1)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def scale_rope_table(side: int, head_dim: int, extent: int = 16):
  """FlowAR's table for a scale of side `side` (row-major tokens spread over `extent`)."""
  pos = scale_positions(side, extent)
  rows = np.repeat(pos, side)
  cols = np.tile(pos, side)
  return rope_table(rows, cols, rope_freqs(head_dim))


def rotate_pairs(x):
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last axis."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x, table):
  """x (..., N, hd) rotated by `table` = (cos, sin) of shape (N, hd); None = identity."""
  if table is None:
    return x
  cos, sin = table
  return x * cos + rotate_pairs(x) * sin
