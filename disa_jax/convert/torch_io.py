"""Safe reading of PyTorch checkpoints and safetensors files into numpy state dicts.

- `.safetensors`: read with `safetensors.numpy` (no torch needed).
- anything else (`.pth`, `.ckpt`, `.pt`, `.bin`): `torch.load(..., weights_only=True)`, i.e.
  PyTorch's restricted unpickler (tensors, containers, primitive types only; additionally
  `argparse.Namespace`, the plain attribute bag MAR's training checkpoints store as 'args').
  An arbitrary pickle is never executed. Zip-format files are memory-mapped, so a 7 GB
  MAR-H checkpoint is not read twice into memory. torch is an optional extra:
  `pip install disa_jax[torch]`.

Errors name the file and the problem (missing, not a checkpoint, needs torch, unsafe pickle).
A pickle that references code is refused naming the referenced global; torch's own advice
(`weights_only=False`, allow-listing globals) is never passed on. Floating tensors are read
as float32; other dtypes are kept so that the converter refuses them by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from disa_jax.errors import UserError


class CheckpointReadError(UserError):
  """The file cannot be read as a weights file; the message says why and what to do."""


def _weights_file(path) -> str:
  """`path` expanded, or a CheckpointReadError when it is missing or a directory."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointReadError(f'checkpoint file {path} does not exist')
  if os.path.isdir(path):
    raise CheckpointReadError(
      f'{path} is a directory; pass the weights file itself (.pth, .ckpt or .safetensors)')
  return path


def load_state_dict(path: str | os.PathLike, *, key: str | None = None,
                    fallback_keys: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], str]:
  """Reads `path` and returns (flat state dict of float32 numpy arrays, entry used).

  For pickled checkpoints holding several entries (e.g. {'model', 'model_ema'}), `key` picks
  one, then `fallback_keys` are tried in order; '' means the file itself is the state dict.
  """
  path = _weights_file(path)
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


def load_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Every state dict in a weights file, by entry: {'': sd} for a bare state dict (and any
  .safetensors file), else {entry: sd} for each top-level entry that holds tensors (e.g.
  'model' and 'model_ema' of a MAR training checkpoint; 'optimizer', 'args', ... are skipped).
  """
  path = _weights_file(path)
  if path.endswith('.safetensors'):
    return {'': _read_safetensors(path)}
  obj = _torch_load(path)
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(
      f'{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict')
  if any(_is_tensor(v) for v in obj.values()):
    return {'': _to_numpy(obj, path)}
  out = {str(k): _to_numpy(v, path) for k, v in obj.items()
         if isinstance(v, Mapping) and any(_is_tensor(t) for t in v.values())}
  if not out:
    raise CheckpointReadError(
      f'{path} contains no state dict (no tensors at the top level nor in any entry; '
      f'entries: {", ".join(map(str, obj)) or "none"})')
  return out


def _is_tensor(v) -> bool:
  import torch

  return isinstance(v, torch.Tensor | np.ndarray)


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
  return {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == 'f' else np.asarray(v)
          for k, v in raw.items()}


def _torch_load(path: str):
  try:
    import torch
  except ImportError:
    raise CheckpointReadError(
      f'reading {os.path.basename(path)} needs torch; install it with '
      "`pip install 'disa_jax[torch]'` (torch==2.13.0 CPU), or convert a .safetensors file "
      'instead') from None
  import argparse

  with open(path, 'rb') as f:
    head = f.read(4)
  zipped = head.startswith(b'PK\x03\x04')
  if not zipped and not head.startswith(b'\x80'):   # torch files: zip archive or a pickle
    raise CheckpointReadError(
      f'{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); '
      'pass the .pth/.ckpt file or a .safetensors file')
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location='cpu', weights_only=True, mmap=zipped)
  except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
    raise CheckpointReadError(refusal_message(path, e)) from None


# torch's own texts recommend `weights_only=False` or allow-listing globals: never shown.
_UNSAFE_ADVICE = ('weights_only', 'safe_globals', 'add_safe_globals', 'trust', 'pickle.load',
                  'allow_pickle')
_GLOBAL = re.compile(r'GLOBAL\s+([\w.]+)')   # torch's pickle opcode name, upper case


def refusal_message(path: str, error: BaseException) -> str:
  """The one-line refusal for a file torch could not load with `weights_only=True`.

  A pickle that references code (any GLOBAL outside torch's allow-list: `posix.system`,
  `builtins.eval`, a class) is refused naming the global; torch 2.13 words this both as
  'Unsupported global: GLOBAL x' and 'unsupported GLOBAL x whose module x is blocked'. No text
  suggesting `weights_only=False` (or allow-listing) ever reaches the user.
  """
  text = str(error)
  blocked = [ln for ln in text.splitlines()
             if 'unsupported global' in ln.lower() or _GLOBAL.search(ln)]
  if blocked:
    m = next((_GLOBAL.search(ln) for ln in blocked if _GLOBAL.search(ln)), None)
    what = f'it references {m.group(1)}; ' if m else ''
    return (f'{path} contains objects other than tensors; refusing to unpickle it ({what}only '
            'tensors, containers and numbers are read). Re-save the state dict alone or '
            'convert a .safetensors file')
  lines = [ln.strip() for ln in text.splitlines()
           if ln.strip() and not any(w in ln.lower() for w in _UNSAFE_ADVICE)]
  msg = lines[0] if lines else error.__class__.__name__
  return f'{path} is not a PyTorch checkpoint ({msg})'


def _to_numpy(state: Mapping, path: str) -> dict[str, np.ndarray]:
  import torch

  out = {}
  for k, v in state.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      # floating tensors (f16/bf16/f32/f64) -> float32; others keep their dtype so that
      # `mapping.convert_state_dict` can refuse them by name (ints, bools, complex)
      out[str(k)] = (v.to(torch.float32) if v.is_floating_point() else v).numpy()
    elif isinstance(v, np.ndarray):
      out[str(k)] = v.astype(np.float32) if v.dtype.kind == 'f' else v
  if not out:
    raise CheckpointReadError(f'{path} contains no tensors at the top level of the chosen entry')
  return out
