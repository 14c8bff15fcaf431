"""Ahead-of-time executables whose traces are kept on disk (issue 20: the warm start).

The persistent XLA cache (`runtime.compilation_cache`) skips XLA's compile on a warm start,
but each executable is still traced and lowered in Python first (flax module calls, a
transformer per bucket), which is most of a warm start. `lower` keeps each lowered function as
a serialized `jax.export.Exported` in a trace directory, keyed by everything the trace depends
on: the function's name and static arguments, the model's fingerprint, every argument's
shape / dtype / sharding, jit shardings and donation, the matmul precision, the jax / jaxlib /
flax versions and a hash of the disa_jax source. A warm start deserializes the module and
lowers a thin call to it (milliseconds); compiling that call then hits the XLA cache.

Arguments are flattened to their leaves for the exported function (nnx `State` pytrees have
no export serialization); `FlatExecutable` takes the original pytrees. Outputs keep their
structure (tuples / dicts of arrays). A trace file that cannot be read is traced again and
replaced; a trace directory that cannot be written only costs the next start its trace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import tempfile
import warnings

import jax

TRACE_SUFFIX = '.exported'


@functools.cache
def source_fingerprint() -> str:
  """sha256 of every disa_jax source file (path and bytes) and the jax / jaxlib / flax
  versions: any code or library change gives new trace keys."""
  import flax
  import jaxlib

  root = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256(f'{jax.__version__} {jaxlib.__version__} {flax.__version__}'.encode())
  for path in sorted(root.rglob('*.py')):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def model_fingerprint(config, state) -> str:
  """The model's identity for trace keys: its config and the path / shape / dtype of every
  parameter (not the values, which are arguments)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  spec = [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in leaves]
  return hashlib.sha256(repr((repr(config), spec)).encode()).hexdigest()


def _leaf_spec(x) -> list:
  return [tuple(getattr(x, 'shape', ())), str(getattr(x, 'dtype', type(x).__name__)),
          str(getattr(x, 'sharding', None))]


def _per_leaf(value, counts: list[int]):
  """A per-argument jit option (a tuple with one entry per argument) per flattened leaf."""
  if not isinstance(value, (tuple, list)):
    return value
  return tuple(v for v, n in zip(value, counts, strict=True) for _ in range(n))


class FlatExecutable:
  """A compiled function of flattened arguments, called with the original pytrees."""

  def __init__(self, compiled):
    self.compiled = compiled

  def __call__(self, *args):
    return self.compiled(*jax.tree.leaves(args))

  @property
  def out_info(self):
    return self.compiled.out_info


class FlatLowered:
  """`jax.stages.Lowered` of a flattened call; `compile()` gives a `FlatExecutable`."""

  def __init__(self, lowered, loaded: bool):
    self.lowered, self.loaded = lowered, loaded

  def compile(self) -> FlatExecutable:
    return FlatExecutable(self.lowered.compile())


def trace_key(name: str, static: dict, args, jit_kwargs: dict, model_key: str) -> str:
  """The file name (a sha256) of the trace of `name` for these static arguments and argument
  specs; `static['graphdef']` is represented by `model_key`."""
  statics = sorted((k, repr(v)) for k, v in static.items() if k != 'graphdef')
  desc = dict(name=name, static=statics, model=model_key, source=source_fingerprint(),
              args=[_leaf_spec(x) for x in jax.tree.leaves(args)],
              tree=str(jax.tree.structure(args, is_leaf=lambda x: x is None)),
              jit={k: repr(v) for k, v in sorted(jit_kwargs.items())},
              precision=str(jax.config.jax_default_matmul_precision),
              x64=bool(jax.config.jax_enable_x64))
  return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def lower(name: str, fn, static: dict, jit_kwargs: dict, args: tuple, *, trace_dir: str,
          model_key: str) -> FlatLowered:
  """Lowers `functools.partial(fn, **static)` jitted with `jit_kwargs` for `args` (arrays or
  `jax.ShapeDtypeStruct`s), reusing the trace stored in `trace_dir` when there is one."""
  leaves, treedef = jax.tree.flatten(args)
  counts = [len(jax.tree.leaves(a)) for a in args]
  flat_kwargs = dict(jit_kwargs)
  if 'in_shardings' in flat_kwargs:
    flat_kwargs['in_shardings'] = _per_leaf(flat_kwargs['in_shardings'], counts)
  if 'donate_argnums' in flat_kwargs:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    flat_kwargs['donate_argnums'] = tuple(
      starts[i] + j for i in flat_kwargs['donate_argnums'] for j in range(counts[i]))
  path = os.path.join(trace_dir, trace_key(name, static, args, jit_kwargs, model_key)
                      + TRACE_SUFFIX)
  exported = _read(path)
  loaded = exported is not None
  if exported is None:
    bound = functools.partial(fn, **static)

    def flat(*xs):
      return bound(*jax.tree.unflatten(treedef, xs))

    exported = jax.export.export(jax.jit(flat, **flat_kwargs))(*leaves)
    _write(path, exported.serialize())
  return FlatLowered(jax.jit(exported.call, **flat_kwargs).lower(*leaves), loaded)


def _read(path: str):
  try:
    with open(path, 'rb') as f:
      blob = f.read()
  except OSError:
    return None
  try:
    return jax.export.deserialize(bytearray(blob))
  except Exception:   # noqa: BLE001 (a damaged or foreign file: trace again, then replace it)
    return None


@functools.cache
def _warn_unwritable(directory: str, reason: str) -> None:
  warnings.warn(f'trace cache {directory} is not writable ({reason}); traces are not kept',
                stacklevel=3)


def _write(path: str, blob: bytes) -> None:
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.trace-')
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(blob)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    _warn_unwritable(directory, e.strerror or type(e).__name__)


def trace_dir_beside_xla_cache(enabled: bool = True) -> str | None:
  """`<persistent XLA cache>/traces` when a local XLA cache is configured (`jax_compilation_
  cache_dir`, set from `runtime.compilation_cache` by the CLIs) and `enabled`; else None (a
  remote gs:// cache keeps no traces)."""
  cache = jax.config.jax_compilation_cache_dir
  if not enabled or not cache or '://' in str(cache):
    return None
  return os.path.join(str(cache), 'traces')
