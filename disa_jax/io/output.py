"""Run outputs: one atomic output directory for every command (write `<out>.partial`, rename).

Rules (issue 11, rule 4), checked when the `OutputDir` is created, before any work starts:
- `out` must not be an existing file, and must not be, contain or lie inside an input path
  (checkpoint, VAE, data): `--overwrite` never deletes what the run reads;
- an existing `out` is replaced only with `overwrite=True` and only when it carries this
  project's marker file (`.disa_jax-output`, written into every finished output), so a user
  directory full of unrelated files is never deleted;
- a lock file `<out>.lock` (holding `pid@host`) makes a second run on the same `out` refuse
  with a clear message while the first is alive (a stale lock of a dead process on this host
  is taken over).
"""

from __future__ import annotations

import json
import os
import socket

from disa_jax.errors import UserError

OUTPUT_MARKER = '.disa_jax-output'


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




def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_path(final: str, *, overwrite: bool, inputs=()) -> None:
  """The output rules above (raises UserError; touches nothing)."""
  real = os.path.realpath(final)
  for inp in inputs:
    if not inp or '://' in str(inp):
      continue
    ri = os.path.realpath(os.path.expanduser(str(inp)))
    if _inside(ri, real) or _inside(real, ri):
      raise UserError(f'output {final} would overwrite the input {inp}; choose another --out')
  if os.path.lexists(final) and not os.path.isdir(final):
    raise UserError(f'output {final} exists and is not a directory; choose another --out')
  if os.path.isdir(final):
    if not overwrite:
      raise UserError(f'output {final} already exists; pass --overwrite or choose another --out')
    if not os.path.exists(os.path.join(final, OUTPUT_MARKER)):
      raise UserError(f'refusing to replace {final}: it was not written by disa_jax (no '
                      f'{OUTPUT_MARKER} marker); remove it yourself or choose another --out')
  parent = os.path.dirname(final) or '.'
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f'cannot write {final}: {parent} is a file; choose another --out')


class OutputLock:
  """`<path>.lock` created exclusively; refuses while another live process holds it."""

  def __init__(self, path: str):
    self.path = path + '.lock'
    self.held = False

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    me = f'{os.getpid()}@{socket.gethostname()}'
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if self._stale():
          try:
            os.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        raise UserError(f'another run ({self._owner() or "unknown process"}) is writing '
                        f'{self.path[:-5]} (lock {self.path}); wait for it to finish or choose '
                        'another --out') from None
      except OSError as e:
        raise UserError(f'cannot create {self.path}: {e.strerror}; choose a writable --out') from None
      with os.fdopen(fd, 'w') as f:
        f.write(me)
      self.held = True
      return
    raise UserError(f'cannot take the lock {self.path}; remove it if no run is writing there')

  def _owner(self) -> str:
    try:
      with open(self.path) as f:
        return f.read().strip()
    except OSError:
      return ''

  def _stale(self) -> bool:
    pid, _, host = self._owner().partition('@')
    if host != socket.gethostname() or not pid.isdigit():
      return False
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      return True
    except PermissionError:
      return False
    return False

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False


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

  def __init__(self, out: str, *, overwrite: bool = False, inputs=()):
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
      raise UserError(f'output {self.final} already exists (on at least one process); pass '
                      '--overwrite or choose another --out')
    check_output_path(self.final, overwrite=overwrite, inputs=inputs)
    self._lock = OutputLock(self.final)
    if self.is_main:
      self._lock.acquire()

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
      self._lock.release()
      return False
    sharding.sync(f'disa_jax:end:{self._token}')
    try:
      if self.owner:
        if os.path.exists(self._marker):
          os.remove(self._marker)
        write_json(os.path.join(self.path, OUTPUT_MARKER), {'format': 'disa_jax.output'})
        if os.path.exists(self.final):
          shutil.rmtree(self.final)
        os.replace(self.path, self.final)
      sharding.sync(f'disa_jax:renamed:{self._token}')
    finally:
      self._lock.release()
    return False
