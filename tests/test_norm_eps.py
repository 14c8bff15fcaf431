"""Normalisation eps pinned by value: inputs small enough (mean x^2 ~ eps) that a wrong eps
changes the output by tens of percent, against the PyTorch reference formulas. (At unit-scale
inputs 1e-5 vs 1e-6 moves the output by ~5e-6 only: the mutation `flowar.rms_eps` survived
the unit-scale parity test.)"""

import jax.numpy as jnp
import numpy as np
import torch

from disa_jax.layers.norms import RMSNorm
from disa_jax.layers.qwen2 import RMSNorm as QwenRMSNorm
from reference import flowar as ref


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _small_x():
  return (np.random.default_rng(0).normal(size=(4, 32)) * 1e-3).astype(np.float32)


def test_flowar_rms_norm_eps_at_small_inputs():
  x = _small_x()
  want = ref.RMSNorm(32)(torch.from_numpy(x)).detach().numpy()
  assert _rel(RMSNorm(32)(jnp.asarray(x)), want) < 1e-5
  wrong = ref.RMSNorm(32, eps=1e-5)(torch.from_numpy(x)).detach().numpy()
  assert _rel(wrong, want) > 0.3           # the margin a wrong eps would have to hide in


def test_qwen2_rms_norm_eps_at_small_inputs():
  x = _small_x()
  ms = (x.astype(np.float64) ** 2).mean(-1, keepdims=True)
  want = x / np.sqrt(ms + 1e-6)             # weight initialised to ones
  assert _rel(QwenRMSNorm(32, 1e-6)(jnp.asarray(x)), want) < 1e-5
  assert _rel(x / np.sqrt(ms + 1e-5), want) > 0.3
