"""Shared fixtures of the FlowAR tests: tiny torch reference models with large random weights,
converted to JAX with the real converter (the generic parts live in `tests/flow_testlib.py`)."""

from __future__ import annotations

import dataclasses

import torch
from flow_testlib import (  # noqa: F401  (state_dict_np, max_rel_error re-exported)
  converted_model,
  max_rel_error,
  randomize_reference,
  state_dict_np,
)

from disa_jax.systems.flowar.config import TINY
from disa_jax.systems.flowar.convert import convert_state, read_state_dict
from reference.flowar import FlowARRef


def torch_model(kind: str = 'S', seed: int = 0, scale: float = 0.25) -> FlowARRef:
  """A tiny reference FlowAR (kind 'S': head v1, 'L': head v2) with N(0, scale) weights
  (norm weights 1 + N(0, scale)), so GELU/eps/order mistakes change outputs by a wide margin."""
  torch.manual_seed(seed)
  model = FlowARRef(**dataclasses.asdict(TINY[kind])).eval()
  return randomize_reference(model, seed=seed, scale=scale, norm_suffixes=(
    'norm2_1.weight', 'norm2_2.weight', '_ln.weight', '_norm.weight'))


def jax_model(tmodel, tmp_path=None):
  """The converted nnx model (through a .pth file when tmp_path is given)."""
  return converted_model(tmodel, convert_state, read_state_dict,
                         None if tmp_path is None else tmp_path / 'flowar.pth')
