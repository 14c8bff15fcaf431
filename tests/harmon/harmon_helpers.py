"""Shared pieces of the Harmon tests: a tiny random Harmon and its PyTorch twin."""

import numpy as np
from flax import nnx

from disa_jax.convert.mapping import flax_state_to_torch
from disa_jax.systems.harmon.config import tiny_config
from disa_jax.systems.harmon.model import Harmon


def randomize(model, seed=0, scale=0.1):
  """Every parameter random and non-zero (norm scales near 1): zero-initialised biases, adaLN
  and output layers would hide bugs."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    noise = rng.standard_normal(var.shape).astype(np.float32) * scale
    var[...] = 1.0 + noise if str(path[-1]) == 'scale' else noise
  nnx.update(model, state)
  return model


def tiny_harmon(seed=0):
  return randomize(Harmon(tiny_config(), rngs=nnx.Rngs(seed)), seed)


def torch_twin(model):
  from reference.harmon import TorchHarmon, load_from_flax

  return load_from_flax(TorchHarmon(model.config), flax_state_to_torch(nnx.state(model)))


def prompts(rows, lengths, vocab=512, seed=0, pad_id=0):
  """Right-padded ids [rows, max(lengths)] and validity mask."""
  rng = np.random.default_rng(seed)
  lp = max(lengths)
  ids = np.full((rows, lp), pad_id, np.int64)
  valid = np.zeros((rows, lp), bool)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(0, vocab, n)
    valid[r, :n] = True
  return ids, valid


def max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
