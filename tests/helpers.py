"""Small shared helpers for the tests."""

import numpy as np
from flax import nnx

from disa_jax.config import TINY_MODEL
from disa_jax.models.mar import MAR, MARConfig


def tiny_model(seed=0, **overrides):
  """A 16-token MAR with *non-zero* random parameters everywhere (the official init zeroes
  the head's adaLN and output layers, which would make the head output identically zero)."""
  cfg = MARConfig.from_dict({**TINY_MODEL, **overrides})
  model = MAR(cfg, rngs=nnx.Rngs(seed))
  randomize(model, seed)
  return model


def randomize(model, seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    name = '.'.join(str(p) for p in path)
    noise = rng.standard_normal(var.shape).astype(np.float32) * scale
    var[...] = 1.0 + noise if name.endswith('scale') else noise
  nnx.update(model, state)
  return model


def max_rel_error(a, b) -> float:
  """max |a - b| / max |b|: float32 rounding differences (different matmul blocking for a
  different batch shape or device count) stay ~1e-6 of the tokens' scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
