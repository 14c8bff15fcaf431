"""Mechanical PyTorch state-dict -> Flax NNX state mapping, with strict validation.

The NNX module trees in `disa_jax.models` mirror the official state dicts, so each torch key
maps to one Flax path by a rename of its last component:
  Linear   `P.weight` (out, in) -> `P.kernel` (in, out) = weight.T;  `P.bias` -> `P.bias`
  Conv2d   `P.weight` (O, I, kh, kw) -> `P.kernel` (kh, kw, I, O)
  LayerNorm / GroupNorm `P.weight` -> `P.scale`
  Embedding `P.weight` -> `P.embedding`
  bare parameters (pos-embeds, mask_token, fake_latent) copied as they are
and numeric path components (`encoder_blocks.3`, `mlp.0`) index `nnx.List`s.

Values: only floating tensors become parameters (float16 / bfloat16 / float32 / float64, cast
to float32); integer, boolean and complex tensors and any NaN/Inf value are refused naming
the tensor (`parameter_array`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from disa_jax.errors import UserError


class ConversionError(UserError):
  """The checkpoint does not match the model; the message lists what is wrong."""


def _path_str(path) -> str:
  return '.'.join(str(p) for p in path)


def _flat_target(abstract_state) -> dict[str, tuple]:
  """'a.b.0.kernel' -> (path tuple, shape) for every leaf of an (abstract) NNX state."""
  out = {}
  for path, var in nnx.to_flat_state(abstract_state):
    out[_path_str(path)] = (path, tuple(var.shape))
  return out


def torch_key_to_flax(key: str, target: Mapping[str, tuple]) -> tuple[str, str]:
  """Returns (flax key, transform) for one torch key; transform in {'copy','linear','conv'}."""
  if key in target:
    return key, 'copy'
  prefix, _, leaf = key.rpartition('.')
  if leaf == 'weight':
    for name, transform in (('kernel', None), ('scale', 'copy'), ('embedding', 'copy')):
      cand = f'{prefix}.{name}'
      if cand in target:
        if transform is None:
          transform = 'conv' if len(target[cand][1]) == 4 else 'linear'
        return cand, transform
  return key, 'missing'


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_state, *,
                       what: str = 'model'):
  """Fills `abstract_state` (from `nnx.eval_shape`/`nnx.state`) with torch tensors.

  Every target leaf must be provided exactly once with the expected shape; otherwise a
  `ConversionError` lists the missing, unexpected and mismatched keys. Returns a new state.
  """
  target = _flat_target(abstract_state)
  plan = _match({k: np.shape(v) for k, v in state_dict.items()}, target, what)
  values = {}
  for key, (fkey, transform) in plan.items():
    arr = parameter_array(key, state_dict[key])
    if transform == 'linear' and arr.ndim == 2:
      arr = arr.T
    elif transform == 'conv' and arr.ndim == 4:
      arr = arr.transpose(2, 3, 1, 0)
    values[fkey] = np.ascontiguousarray(arr, dtype=np.float32)
  return nnx.from_flat_state(
    [(path, _replace_value(var, values[_path_str(path)]))
     for path, var in nnx.to_flat_state(abstract_state)])


FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')


def parameter_array(key: str, value) -> np.ndarray:
  """`value` as a float32 array, or a `ConversionError` naming the tensor.

  Only floating tensors can be parameters: float16 / bfloat16 / float32 / float64 are cast to
  float32 (float64 values beyond the float32 range become +-inf and are refused below);
  integer, boolean and complex tensors are refused, as is any NaN or +-Inf value.
  """
  arr = np.asarray(value)
  if arr.dtype.kind != 'f' and arr.dtype.name not in FLOAT_DTYPES:
    raise ConversionError(
      f'tensor {key} has dtype {arr.dtype.name}; a model parameter must be floating point '
      f'({", ".join(FLOAT_DTYPES)}). The file is not a weights checkpoint of this model')
  arr = arr.astype(np.float32, copy=False)
  finite = np.isfinite(arr)
  if not finite.all():
    bad = int(arr.size - np.count_nonzero(finite))
    raise ConversionError(
      f'tensor {key} contains {bad} non-finite value(s) (NaN or Inf) of {arr.size}; the '
      'checkpoint is corrupt or from a diverged run, so it cannot be converted')
  return arr


def check_state_dict(shapes: Mapping[str, tuple], abstract_state, *, what: str = 'model'):
  """The strict validation of `convert_state_dict` on shapes alone (no tensor is read or
  copied): raises `ConversionError` unless `shapes` (torch key -> torch shape) matches."""
  _match({k: tuple(v) for k, v in shapes.items()}, _flat_target(abstract_state), what)


def _match(shapes: Mapping[str, tuple], target: Mapping[str, tuple], what: str):
  """torch key -> (flax key, transform) for all keys, or a `ConversionError` listing problems."""
  plan: dict[str, tuple[str, str]] = {}
  unexpected, mismatched, seen = [], [], set()
  for key, shape in shapes.items():
    shape = tuple(shape)
    fkey, transform = torch_key_to_flax(key, target)
    if transform == 'missing':
      unexpected.append(key)
      continue
    got = shape
    if transform == 'linear' and len(shape) == 2:
      got = shape[::-1]
    elif transform == 'conv' and len(shape) == 4:
      got = (shape[2], shape[3], shape[1], shape[0])
    want = target[fkey][1]
    if got != want:
      mismatched.append(f'{key}: checkpoint {shape}, model expects '
                        f'{_torch_shape(want, transform)}')
      seen.add(fkey)
      continue
    plan[key] = (fkey, transform)
    seen.add(fkey)
  missing = sorted(k for k in target if k not in seen)
  if missing or unexpected or mismatched:
    lines = [f'checkpoint does not match the {what}:']
    for title, items in (('missing keys', [_torch_name(m) for m in missing]),
                         ('unexpected keys', sorted(unexpected)),
                         ('shape mismatches', mismatched)):
      if items:
        shown = ', '.join(items[:12]) + (f', ... ({len(items) - 12} more)' if len(items) > 12
                                         else '')
        lines.append(f'  {len(items)} {title}: {shown}')
    raise ConversionError('\n'.join(lines))
  return plan


def _replace_value(var, value):
  return var.replace(jax.numpy.asarray(value))


def _torch_name(flax_key: str) -> str:
  prefix, _, leaf = flax_key.rpartition('.')
  if leaf in ('kernel', 'scale', 'embedding'):
    return f'{prefix}.weight'
  return flax_key


def _torch_shape(shape, transform):
  if transform == 'linear' and len(shape) == 2:
    return tuple(reversed(shape))
  if transform == 'conv' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def flax_state_to_torch(state) -> dict[str, np.ndarray]:
  """The inverse mapping (Flax state -> official torch key names and layouts), for export and
  for building reference checkpoints in tests."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    key = _path_str(path)
    arr = np.asarray(var[...])
    prefix, _, leaf = key.rpartition('.')
    if leaf == 'kernel':
      arr = arr.T if arr.ndim == 2 else arr.transpose(3, 2, 0, 1)
      key = f'{prefix}.weight'
    elif leaf in ('scale', 'embedding'):
      key = f'{prefix}.weight'
    out[key] = np.ascontiguousarray(arr)
  return out
