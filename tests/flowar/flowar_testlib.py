"""Shared fixtures of the FlowAR tests: tiny torch reference models with large random weights,
converted to JAX with the real converter."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from disa_jax.systems.flowar.config import TINY
from disa_jax.systems.flowar.convert import convert_state, read_state_dict
from reference.flowar import FlowARRef


def torch_model(kind: str = 'S', seed: int = 0, scale: float = 0.25) -> FlowARRef:
  """A tiny reference FlowAR (kind 'S': head v1, 'L': head v2) with N(0, scale) weights
  (norm weights 1 + N(0, scale)), so GELU/eps/order mistakes change outputs by a wide margin."""
  torch.manual_seed(seed)
  model = FlowARRef(**dataclasses.asdict(TINY[kind])).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      if name.endswith('norm2_1.weight') or name.endswith('norm2_2.weight') or \
         name.endswith('_ln.weight') or name.endswith('_norm.weight'):
        p.copy_(1.0 + noise)
      elif p.ndim == 2 and name.endswith('weight') and 'class_emb' not in name:
        p.copy_(noise * (1.0 / np.sqrt(p.shape[1])) * 4.0)
      else:
        p.copy_(noise)
  return model


def state_dict_np(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def saved_pth(model, path) -> str:
  torch.save(model.state_dict(), path)
  return str(path)


def jax_model(tmodel, tmp_path=None):
  """The converted nnx model (through a .pth file when tmp_path is given)."""
  from flax import nnx
  if tmp_path is not None:
    sd = read_state_dict(saved_pth(tmodel, tmp_path / 'flowar.pth'))
  else:
    sd = state_dict_np(tmodel)
  _, graphdef, state = convert_state(sd)
  return nnx.merge(graphdef, state)


def max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
