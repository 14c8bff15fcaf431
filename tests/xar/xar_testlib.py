"""Shared fixtures of the xAR tests: a tiny torch reference xAR with large random weights,
converted to JAX with the real converter (the generic parts live in `tests/flow_testlib.py`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flow_testlib import (  # noqa: F401  (state_dict_np, max_rel_error re-exported)
  converted_model,
  max_rel_error,
  randomize_reference,
  state_dict_np,
)

from disa_jax.systems.xar.config import TINY
from disa_jax.systems.xar.convert import convert_state, read_state_dict
from reference.xar import XARRef


def torch_model(seed: int = 0, scale: float = 0.25, cfg=TINY) -> XARRef:
  """A reference xAR with N(0, scale) weights (norm weights 1 + N(0, scale); matrices scaled by
  4 / sqrt(fan_in)), so GELU / eps / order mistakes change outputs by a wide margin."""
  torch.manual_seed(seed)
  model = XARRef(**dataclasses.asdict(cfg)).eval()
  return randomize_reference(model, seed=seed, scale=scale,
                             norm_suffixes=('_ln.weight', '_norm.weight'))


def jax_model(tmodel, tmp_path=None):
  """The converted nnx model (through a .pth file when tmp_path is given)."""
  return converted_model(tmodel, convert_state, read_state_dict,
                         None if tmp_path is None else tmp_path / 'xar.pth')


def injected_noise(steps, batch: int, seed: int = 0, cell_tokens: int = 64, channels: int = 16):
  """Per cell (initial (B, 64, 16), steps (n - 1, B, 64, 16)), float32 values."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((batch, cell_tokens, channels)).astype(np.float32),
           rng.standard_normal((n - 1, batch, cell_tokens, channels)).astype(np.float32))
          for n in steps]

