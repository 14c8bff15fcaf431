"""Test helpers shared by the FlowAR and xAR tests (`flowar/flowar_testlib.py`,
`xar/xar_testlib.py`): reference models with large random weights, their numpy state dicts and
.pth files, conversion through the real converter."""

from __future__ import annotations

import numpy as np
import torch
from helpers import max_rel_error  # noqa: F401  (re-exported for the system testlibs)


def randomize_reference(model, *, seed: int, scale: float, norm_suffixes: tuple[str, ...]):
  """Overwrites `model`'s parameters: norm weights (names ending in `norm_suffixes`)
  1 + N(0, scale), other matrices (except class embeddings) N(0, scale) * 4 / sqrt(fan_in),
  the rest N(0, scale); large enough that GELU / eps / order mistakes change outputs by a wide
  margin. Returns `model`."""
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      if name.endswith(norm_suffixes):
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


def converted_model(tmodel, convert_state, read_state_dict, pth_path=None):
  """The nnx model `convert_state` makes of `tmodel` (through a .pth file at `pth_path`, read
  back with `read_state_dict`, when given)."""
  from flax import nnx
  sd = state_dict_np(tmodel) if pth_path is None else read_state_dict(saved_pth(tmodel, pth_path))
  _, graphdef, state = convert_state(sd)
  return nnx.merge(graphdef, state)
