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

from disa_jax import integrity
from disa_jax.checkpoint import CheckpointError
from disa_jax.convert.mapping import ConversionError
from disa_jax.errors import UserError
from disa_jax.schedules import ScheduleError


class CliError(Exception):
  """A user error: printed as one line, exit status 2."""


USER_ERRORS = (CliError, UserError, ScheduleError, CheckpointError, ConversionError, FileNotFoundError)


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
    except OSError as e:     # disk full, permission denied, ...: one line naming the path
      err = integrity.write_error(e)
      if err is None:
        raise
      print(f'error: {err}', file=sys.stderr)
      sys.exit(2)
    except ValueError as e:  # validation errors raised below the CLI (configs, plans)
      if _is_validation_error(e):
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
      _exit_if_write_error(e)
      raise
    except Exception as e:  # noqa: BLE001 - e.g. orbax/tensorstore wrapping ENOSPC
      _exit_if_write_error(e)
      raise

  sys.argv = normalize_argv(sys.argv)
  app.run(wrapped, flags_parser=_parse_flags)


def _exit_if_write_error(e: BaseException) -> None:
  """Exits with one line when `e` wraps an environment error of a write (disk full, ...)."""
  err = integrity.write_error(e)
  if err is not None:
    print(f'error: {err}', file=sys.stderr)
    sys.exit(2)


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


# Python packages that give JAX (through etils.epath / fsspec) access to a remote cache.
_REMOTE_FS = {'gs': 'gcsfs', 's3': 's3fs'}


def compilation_cache_dir(cache: str) -> str:
  """The persistent XLA cache location to give JAX ('' = disabled).

  A local path is expanded (~) and created; a URL (gs://bucket/xla, shared by all hosts of a
  pod) is passed through untouched, after checking that its filesystem package is installed.
  """
  if not cache:
    return ''
  scheme, sep, _ = cache.partition('://')
  if not sep or scheme == 'file':
    local = os.path.abspath(os.path.expanduser(cache[7:] if scheme == 'file' else cache))
    try:
      os.makedirs(local, exist_ok=True)
    except OSError as e:
      raise CliError(f'cannot create the compilation cache directory {local}: {e.strerror}; '
                     'set --config.runtime.compilation_cache to a writable path (or "" to '
                     'disable it)') from None
    return local
  import importlib.util

  pkg = _REMOTE_FS.get(scheme)
  if pkg is None:
    raise CliError(f'compilation cache {cache!r}: unsupported scheme {scheme}://; use a local '
                   f'path or one of {", ".join(s + "://" for s in _REMOTE_FS)}')
  if importlib.util.find_spec(pkg) is None or importlib.util.find_spec('fsspec') is None:
    raise CliError(f'compilation cache {cache} needs the {pkg} package; pip install {pkg} '
                   f'(launch/tpu.py setup --extra-pip={pkg}) or use a local path')
  return cache


def setup_runtime(config) -> None:
  """Logging, distributed init, persistent compilation cache (before any computation)."""
  import jax
  from absl import logging as absl_logging

  from disa_jax import sharding

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  sharding.maybe_initialize_distributed()
  cache = compilation_cache_dir(config.runtime.get('compilation_cache', ''))
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def check_config(config) -> None:
  if config is None:
    raise CliError('no config given; pass --config=configs/mar_base.py (or another file in '
                   'configs/)')
  from disa_jax.validation import validate_config

  validate_config(config)        # ranges and finiteness of every numeric field


def write_json(path, obj) -> None:
  """Writes `obj` as JSON atomically (a temporary file named by pid, then a rename)."""
  tmp = f'{path}.tmp{os.getpid()}'
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

  Single process: a plain write-then-rename. Multi-process (all processes enter and leave
  the block together; each writes only its own files, e.g. images named by global image
  id, so nothing collides):
  - the existence check is collective: every process raises the same error;
  - process 0 (re)creates `<out>.partial` with a marker file named by a token it broadcasts;
    another process that sees the marker shares process 0's filesystem (NFS, a bucket mount,
    or the same machine) and only writes into it; one that does not is on its own disk
    (e.g. a TPU pod worker's local disk) and creates and finalises its own `<out>.partial`;
  - after a barrier when all writing is done, each owner renames its `.partial` to `out`,
    so `out` never exists half-written. `is_main` (process 0) writes the shared files.
  On failure the partial directory is removed and `out` is never created.
  """

  MARKER = '.disa-run-'

  def __init__(self, out: str, *, overwrite: bool = False):
    import jax

    from disa_jax import sharding

    self.final = os.path.abspath(os.path.expanduser(out))
    self.path = self.final + '.partial'
    self.overwrite = overwrite
    self.is_main = jax.process_index() == 0
    self.owner = self.is_main     # finalises `path` (process 0, or any process on its own disk)
    self.shared = True            # False on a process that writes to its own disk
    self._marker = ''
    self._token = 0
    if sharding.any_process(os.path.exists(self.final) and not overwrite):
      raise CliError(f'output {self.final} already exists (on at least one process); pass '
                     '--overwrite or choose another --out')

  def _make(self):
    import shutil

    shutil.rmtree(self.path, ignore_errors=True)
    os.makedirs(self.path)

  def __enter__(self):
    import time

    from disa_jax import sharding

    token = sharding.broadcast_int(int.from_bytes(os.urandom(4), 'little') & 0x7FFFFFFF)
    self._token = token
    self._marker = os.path.join(self.path, f'{self.MARKER}{token:08x}')
    if self.is_main:
      self._make()
      open(self._marker, 'w').close()
    sharding.sync(f'disa_jax:start:{token}')
    if not self.is_main:
      seen = os.path.exists(self._marker)
      for _ in range(10):   # a shared filesystem may show process 0's new files late
        if seen or not os.path.exists(self.path):
          break
        time.sleep(0.5)
        seen = os.path.exists(self._marker)
      if not seen:          # own disk: `path` is absent or a leftover of a failed run
        self.shared, self.owner = False, True
        self._make()
    return self

  def __exit__(self, exc_type, exc, tb):
    import shutil

    from disa_jax import sharding

    if exc_type is not None:
      if self.owner:
        shutil.rmtree(self.path, ignore_errors=True)
      return False
    sharding.sync(f'disa_jax:end:{self._token}')
    if self.owner:
      if os.path.exists(self._marker):
        os.remove(self._marker)
      if os.path.exists(self.final):
        shutil.rmtree(self.final)
      os.replace(self.path, self.final)
    sharding.sync(f'disa_jax:renamed:{self._token}')
    return False
