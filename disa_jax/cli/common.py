"""Shared command-line plumbing: config loading, one-line errors, runtime setup, outputs.

Every entry point uses absl flags with `--config=FILE[:ARG]` (ml_collections) plus
`--config.a.b=value` overrides. Flag names accept dashes or underscores (`--num-images` and
`--num_images`). Errors the user can fix are raised as `CliError` and printed as one line
starting with `error:`; the process exits with status 2 and leaves no partial output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags

from disa_jax.checkpoint import CheckpointError
from disa_jax.convert.mapping import ConversionError
from disa_jax.schedules import ScheduleError


class CliError(Exception):
  """A user error: printed as one line, exit status 2."""


USER_ERRORS = (CliError, ScheduleError, CheckpointError, ConversionError, FileNotFoundError)


def normalize_argv(argv: list[str]) -> list[str]:
  """`--num-images=3` -> `--num_images=3` (absl wants underscores); `--config.*` untouched."""
  out = []
  for a in argv:
    if a.startswith('--') and not a.startswith('--config.'):
      name, eq, value = a[2:].partition('=')
      a = '--' + name.replace('-', '_') + eq + value
    out.append(a)
  return out


def main(run_fn: Callable[[list[str]], None]):
  """Runs an absl app whose body raises `USER_ERRORS` for bad input."""

  def wrapped(argv):
    try:
      run_fn(argv)
    except USER_ERRORS as e:
      msg = str(e).strip() or e.__class__.__name__
      first, *rest = msg.splitlines()
      print(f'error: {first}', file=sys.stderr)
      for line in rest:
        print(f'  {line.strip()}', file=sys.stderr)
      sys.exit(2)
    except ValueError as e:  # validation errors raised below the CLI (configs, plans)
      if _is_validation_error(e):
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
      raise

  sys.argv = normalize_argv(sys.argv)
  app.run(wrapped, flags_parser=_parse_flags)


def _is_validation_error(e: ValueError) -> bool:
  tb = e.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = tb.tb_frame.f_code.co_filename
  return f'{os.sep}disa_jax{os.sep}' in path and f'{os.sep}site-packages{os.sep}jax' not in path


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    print(f'Try --helpfull for the list of flags of {os.path.basename(argv[0])}.',
          file=sys.stderr)
    sys.exit(2)


def setup_runtime(config) -> None:
  """Logging, distributed init, persistent compilation cache (before any computation)."""
  import jax
  from absl import logging as absl_logging

  from disa_jax import sharding

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  sharding.maybe_initialize_distributed()
  cache = config.runtime.get('compilation_cache', '')
  if cache:
    if '://' not in cache:
      cache = os.path.expanduser(cache)
      os.makedirs(cache, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def check_config(config) -> None:
  if config is None:
    raise CliError('no config given; pass --config=configs/mar_base.py (or another file in '
                   'configs/)')


def write_json(path, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)


def _json_default(o):
  import numpy as np

  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def parse_int_list(text: str, name: str) -> list[int]:
  if not text:
    return []
  try:
    return [int(x) for x in text.replace(' ', '').split(',') if x]
  except ValueError:
    raise CliError(f'{name} must be comma-separated integers, got {text!r}') from None


class OutputDir:
  """Writes into `<out>.partial` and renames it to `out` when the block succeeds.

  Multi-process safe: process 0 prepares and finalises the directory, all processes write
  their own files (named by global image index, so they never collide) between barriers.
  On failure the partial directory is removed (single process) and `out` is never created.
  """

  def __init__(self, out: str, *, overwrite: bool = False):
    import jax

    self.final = os.path.abspath(os.path.expanduser(out))
    self.path = self.final + '.partial'
    self.overwrite = overwrite
    self.is_main = jax.process_index() == 0
    if os.path.exists(self.final) and not overwrite:
      raise CliError(f'output {self.final} already exists; pass --overwrite or choose another '
                     '--out')

  def _barrier(self, name):
    import jax

    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'disa_jax:{name}:{self.final}')

  def __enter__(self):
    import shutil

    if self.is_main:
      shutil.rmtree(self.path, ignore_errors=True)
      os.makedirs(self.path)
    self._barrier('start')
    return self

  def __exit__(self, exc_type, exc, tb):
    import shutil

    if exc_type is not None:
      if self.is_main:
        shutil.rmtree(self.path, ignore_errors=True)
      return False
    self._barrier('end')
    if self.is_main:
      if os.path.exists(self.final):
        shutil.rmtree(self.final)
      os.replace(self.path, self.final)
    self._barrier('renamed')
    return False
