"""FlowAR's next-scale input: torch bicubic up to 16x16, then area down to twice the side.

Official: `FlowAR.sample_tokens` / `FlowAR.forward` in `FlowAR_DiSA/models/flowar.py`:
`interpolate(interpolate(x, (16, 16), mode='bicubic'), (2m, 2m), mode='area')` on the (B, C, m, m)
latent (spec §3.4). Both ops are linear and separable, so per channel u = M_m X M_m^T with a
fixed (2m x m) matrix M_m = Area(16 -> 2m) . Bicubic(m -> 16):
  bicubic (align_corners=False, no antialias): src = (o + 0.5) m / 16 - 0.5, taps floor(src)-1
  .. floor(src)+2, cubic convolution with a = -0.75, out-of-range taps clamped to the edge;
  area with integer factor k = 16 / (2m): mean over k x k blocks (m = 8: identity).
The matrices are dyadic rationals, exact in float32. Tokens are row-major (l = r m + c).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75


def _cubic_weights(t: float) -> list[float]:
  """torch's cubic-convolution weights for the 4 taps at fractional offset t."""
  a = CUBIC_A

  def near(x):      # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):       # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) float64 matrix of torch's 1-D bicubic resize (align_corners=False)."""
  out = np.zeros((size_out, size_in))
  scale = size_in / size_out
  for o in range(size_out):
    src = scale * (o + 0.5) - 0.5
    base = int(np.floor(src))
    for tap, w in zip(range(base - 1, base + 3), _cubic_weights(src - base), strict=True):
      out[o, min(max(tap, 0), size_in - 1)] += w
  return out


def area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) block-mean matrix (integer factor only, as FlowAR uses it)."""
  if size_in % size_out:
    raise ValueError(f'area resize {size_in} -> {size_out} needs an integer factor')
  k = size_in // size_out
  return np.kron(np.eye(size_out), np.full((1, k), 1.0 / k))


@functools.cache
def next_scale_matrix(side: int, full: int = 16, next_side: int | None = None) -> np.ndarray:
  """M (next_side x side), float32: area(full -> next_side) @ bicubic(side -> full)."""
  next_side = 2 * side if next_side is None else next_side
  return (area_matrix(full, next_side) @ bicubic_matrix(side, full)).astype(np.float32)


def next_scale_input(sample, side: int, next_side: int | None = None, full: int = 16):
  """sample (B, side^2, C) row-major tokens -> (B, next_side^2, C) next-scale input."""
  b, n, c = sample.shape
  m = jnp.asarray(next_scale_matrix(side, full, next_side))
  grid = sample.reshape(b, side, side, c)
  up = jnp.einsum('or,brcC,pc->bopC', m, grid, m, precision='highest')
  return up.reshape(b, -1, c)
