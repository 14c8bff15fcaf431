"""RMSNorm as used by FlowAR / xAR (`FlowAR_DiSA/models/flowar.py`, `flowmodel.py`, xAR `xar.py`).

  y = x * rsqrt(mean(x^2, last axis) + eps)          computed in float32, cast back to x.dtype
  y = y * weight                                      only when `use_weight` (learned, init 1)

No mean subtraction, no bias. The learned vector is stored as `scale` (torch key `weight`), so
the mechanical converter maps `P.weight` -> `P.scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x, eps: float = 1e-6):
  """The parameter-free normalisation x / sqrt(mean(x^2) + eps), in float32, cast back."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis of width `dim`; `use_weight=False` holds no parameter."""

  def __init__(self, dim: int, *, use_weight: bool = False, eps: float = 1e-6):
    self.dim = dim
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32)) if use_weight else None

  def __call__(self, x):
    y = rms_normalize(x, self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(y.dtype)
    return y
