"""Reading an official PyTorch state dict for the strict per-system converters (FlowAR, xAR).

`read_official_state_dict` accepts a `.safetensors` file or a `.pth` read with the project's
safe torch loader (`torch_io._torch_load`, weights_only), unwraps a training checkpoint's
entry (`model_ema` for weights='ema', else the system's raw entries), and returns
{key: numpy array} with dtypes preserved (bfloat16 widened to float32, the only dtype numpy
lacks). Every refusal goes through the caller's `fail(message)` so it raises that system's
ConversionError subclass. `count_indexed` / `need` read architecture facts from key shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import numpy as np

from disa_jax.errors import UserError


def read_official_state_dict(path, *, weights: str, system: str, fail: Callable,
                             ema_entries=('model_ema', 'model'),
                             raw_entries=('model',)) -> dict[str, np.ndarray]:
  """The raw state dict of `system`'s weights file (see the module docstring)."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    fail(f'{system} checkpoint {path} does not exist or is not a file; pass the .pth or '
         '.safetensors weights file')
  if weights not in ('ema', 'raw'):
    fail(f'weights must be ema or raw, got {weights!r}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # noqa: BLE001 - several error types
      fail(f'{path} is not a readable safetensors file ({str(e).splitlines()[0]})')
  import torch

  from disa_jax.convert import torch_io

  try:
    obj = torch_io._torch_load(path)
  except UserError as e:
    fail(str(e))
  if not isinstance(obj, Mapping):
    fail(f'{path} holds a {type(obj).__name__}, not a state dict of {system} weights')
  if not any(isinstance(v, torch.Tensor) for v in obj.values()):
    order = ema_entries if weights == 'ema' else raw_entries
    entry = next((e for e in order if isinstance(obj.get(e), Mapping)), None)
    if entry is None:
      fail(f'{path} holds no state dict (entries: {", ".join(map(str, obj))}); pass the '
           f'official {system}-*.pth file')
    obj = obj[entry]
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      fail(f'{path}: entry {k!r} is a {type(v).__name__}, not a tensor')
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[str(k)] = v.detach().cpu().numpy()
  return out


def need(shapes: Mapping, key: str, *, system: str, fail: Callable):
  """shapes[key], or `fail` naming the missing key."""
  if key not in shapes:
    fail(f'checkpoint is not {system} model: key {key} is missing')
  return shapes[key]


def count_indexed(shapes: Mapping, prefix: str) -> int:
  """1 + the largest i of keys `prefix<i>.` (0 when there is none): e.g. blocks."""
  idx = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r'(\d+)\.', k))}
  return max(idx) + 1 if idx else 0
