"""Shared fixtures of the xAR tests: a tiny torch reference xAR with large random weights,
converted to JAX with the real converter."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from disa_jax.systems.xar.config import TINY
from disa_jax.systems.xar.convert import convert_state, read_state_dict
from reference.xar import XARRef


def torch_model(seed: int = 0, scale: float = 0.25, cfg=TINY) -> XARRef:
  """A reference xAR with N(0, scale) weights (norm weights 1 + N(0, scale); matrices scaled by
  4 / sqrt(fan_in)), so GELU / eps / order mistakes change outputs by a wide margin."""
  torch.manual_seed(seed)
  model = XARRef(**dataclasses.asdict(cfg)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      if name.endswith('_ln.weight') or name.endswith('_norm.weight'):
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
    sd = read_state_dict(saved_pth(tmodel, tmp_path / 'xar.pth'))
  else:
    sd = state_dict_np(tmodel)
  _, graphdef, state = convert_state(sd)
  return nnx.merge(graphdef, state)


def injected_noise(steps, batch: int, seed: int = 0, cell_tokens: int = 64, channels: int = 16):
  """Per cell (initial (B, 64, 16), steps (n - 1, B, 64, 16)), float32 values."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((batch, cell_tokens, channels)).astype(np.float32),
           rng.standard_normal((n - 1, batch, cell_tokens, channels)).astype(np.float32))
          for n in steps]


def max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
