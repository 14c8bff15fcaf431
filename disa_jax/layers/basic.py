"""Small building blocks shared by the MAR modules (PyTorch-parity defaults).

- `linear`: `nnx.Linear` with the official init (xavier-uniform kernel, zero bias) and a compute
  dtype; kernels are stored (in, out), i.e. the transpose of torch's `weight`.
- `layer_norm`: eps 1e-6 and the two-pass variance torch uses (`use_fast_variance=False`),
  always computed in float32.
- `SiLU`: a parameterless module so `nnx.List([Linear, SiLU(), Linear])` keeps the official
  `Sequential` indices (`mlp.0`, `mlp.2`, `adaLN_modulation.1`) in the state tree.
- `dropout`: explicit-key dropout, so training stays a pure function of (state, batch, key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

xavier_uniform = jax.nn.initializers.xavier_uniform()
normal_002 = jax.nn.initializers.normal(stddev=0.02)


def linear(
  in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=None, kernel_init=xavier_uniform
) -> nnx.Linear:
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=True,
    dtype=dtype,
    kernel_init=kernel_init,
    bias_init=jax.nn.initializers.zeros,
    rngs=rngs,
  )


def layer_norm(features: int, *, rngs: nnx.Rngs, affine: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    features,
    epsilon=1e-6,
    use_fast_variance=False,
    use_bias=affine,
    use_scale=affine,
    dtype=jnp.float32,
    rngs=rngs,
  )


class SiLU(nnx.Module):
  """x * sigmoid(x); holds no parameters (index placeholder in an `nnx.List`)."""

  def __call__(self, x):
    return jax.nn.silu(x)


def dropout(x, rate: float, key):
  """Inverted dropout; identity when `key` is None or `rate` is 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_key(key, n: int):
  """`n` keys from `key`, or n Nones when `key` is None (eval mode)."""
  if key is None:
    return [None] * n
  return list(jax.random.split(key, n))
