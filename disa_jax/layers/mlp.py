"""The gated MLP of FlowAR / xAR blocks: timm's `SwiGLU` class built with an exact-GELU gate.

Official: `FlowAR_DiSA/models/flowar.py` / `flowmodel.py` pass `mlp_layer=SwiGLU` and their
default `act_layer=nn.GELU` (erf GELU, not SiLU) into timm 0.9.12's `SwiGLU`:

  MLP(u) = fc2( GELU(fc1_g(u)) * fc1_x(u) )        fc1_g, fc1_x: Linear(D -> F), fc2: Linear(F -> D)

with F = int(D * mlp_ratio * 2 / 3) (2048 for D=768, 2730 for 1024, 3413 for 1280, 4096 for 1536).
The activation goes on the `fc1_g` branch. All three Linears have biases.

`dense` is the Linear factory every FlowAR/xAR layer uses (xavier-uniform kernel, zero bias, as
the official init).
"""

from __future__ import annotations

import jax
from flax import nnx

xavier_uniform = jax.nn.initializers.xavier_uniform()


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
          dtype=None) -> nnx.Linear:
  """`nnx.Linear` with the official init (xavier-uniform kernel, zero bias); the kernel is
  stored (in, out), i.e. torch's `weight` transposed."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    kernel_init=xavier_uniform, bias_init=jax.nn.initializers.zeros, rngs=rngs)


def gated_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
  """Hidden width as the official blocks compute it: int(dim * mlp_ratio * 2 / 3.)."""
  return int(dim * mlp_ratio * 2 / 3.)


class GatedMLP(nnx.Module):
  """fc2(gelu_erf(fc1_g(u)) * fc1_x(u)); parameter names match the torch keys."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1_g = dense(dim, hidden, rngs=rngs)
    self.fc1_x = dense(dim, hidden, rngs=rngs)
    self.fc2 = dense(hidden, dim, rngs=rngs)

  def __call__(self, u):
    return self.fc2(jax.nn.gelu(self.fc1_g(u), approximate=False) * self.fc1_x(u))
