"""Safe reading of PyTorch checkpoints and safetensors files into numpy state dicts.

- `.safetensors`: read with `safetensors.numpy` (no torch needed).
- anything else (`.pth`, `.ckpt`, `.pt`, `.bin`): `torch.load(..., weights_only=True)`, i.e.
  PyTorch's restricted unpickler (tensors, containers, primitive types only). An arbitrary
  pickle is never executed. torch is an optional extra: `pip install disa_jax[torch]`.

Errors name the file and the problem (missing, not a checkpoint, needs torch, unsafe pickle).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


class CheckpointReadError(ValueError):
  """The file cannot be read as a weights file; the message says why and what to do."""


def load_state_dict(path: str | os.PathLike, *, key: str | None = None,
                    fallback_keys: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], str]:
  """Reads `path` and returns (flat state dict of float32 numpy arrays, entry used).

  For pickled checkpoints holding several entries (e.g. {'model', 'model_ema'}), `key` picks
  one, then `fallback_keys` are tried in order; '' means the file itself is the state dict.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointReadError(f'checkpoint file {path} does not exist')
  if os.path.isdir(path):
    raise CheckpointReadError(
      f'{path} is a directory; pass the weights file itself (.pth, .ckpt or .safetensors)')
  if path.endswith('.safetensors'):
    return _read_safetensors(path), ''
  obj = _torch_load(path)
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(
      f'{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict')
  used = ''
  for k in ((key,) if key else ()) + tuple(fallback_keys):
    if k and k in obj and isinstance(obj[k], Mapping):
      obj, used = obj[k], k
      break
  return _to_numpy(obj, path), used


def list_entries(path: str | os.PathLike) -> list[str]:
  """Top-level keys of a pickled checkpoint dict (e.g. ['model', 'model_ema'])."""
  path = os.path.expanduser(os.fspath(path))
  if path.endswith('.safetensors'):
    return []
  obj = _torch_load(path)
  return [k for k in obj if isinstance(obj.get(k), Mapping)] if isinstance(obj, Mapping) else []


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError as e:  # pragma: no cover - safetensors is a core dependency
    raise CheckpointReadError('reading .safetensors needs the safetensors package') from e
  try:
    raw = load_file(path)
  except Exception as e:  # noqa: BLE001 - safetensors raises several error types
    raise CheckpointReadError(f'{path} is not a valid safetensors file ({e})') from None
  return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def _torch_load(path: str):
  try:
    import torch
  except ImportError:
    raise CheckpointReadError(
      f'reading {os.path.basename(path)} needs torch; install it with '
      "`pip install 'disa_jax[torch]'` (torch==2.13.0 CPU), or convert a .safetensors file "
      'instead') from None
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
    msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
    if 'Weights only load failed' in str(e) or 'Unsupported global' in str(e):
      raise CheckpointReadError(
        f'{path} contains objects other than tensors; refusing to unpickle it (only '
        'weights_only=True loading is allowed). Re-save the state dict alone or use '
        f'safetensors. Detail: {msg}') from None
    raise CheckpointReadError(f'{path} is not a PyTorch checkpoint ({msg})') from None


def _to_numpy(state: Mapping, path: str) -> dict[str, np.ndarray]:
  import torch

  out = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      out[str(k)] = v.detach().to(torch.float32).cpu().numpy()
    elif isinstance(v, np.ndarray):
      out[str(k)] = v.astype(np.float32)
  if not out:
    raise CheckpointReadError(f'{path} contains no tensors at the top level of the chosen entry')
  return out
