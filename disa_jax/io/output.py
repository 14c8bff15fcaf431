"""Outputs: the one implementation of atomic / resumable writes for every command.

Pieces (each command uses the one that fits; all share the same rename and marker logic):
- `atomic_file(path)`: one file via a temporary sibling and `os.replace` (`write_json`, the
  evidence figures through `FileSet`).
- `atomic_directory(final)`: a directory built in a hidden sibling `.NAME.tmp-PID-*` (stale ones
  of killed processes are removed) and swapped in (`swap_into_place`): model directories
  (`checkpoint.save_model`, `disa-convert`, `disa-train --export`).
- `OutputDir(out)`: a run output (`disa-sample`, `disa-demo`, D-AR's commands): written into
  `<out>.partial`, multi-process aware, marker + lock, renamed when the block succeeds.
- `ResumableDir(out, fingerprint)`: a run that may be interrupted and continued (`disa-eval`):
  `<out>.partial` is kept across invocations with `run.json` (what determines the results); a
  continuation with another fingerprint refuses and names the difference; `finish()` adds the
  marker and renames.
- `FileSet(out)`: named result files in a directory (`disa-evidence`), each atomic.

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

import contextlib
import json
import os
import socket

from disa_jax.errors import UserError

OUTPUT_MARKER = '.disa_jax-output'


def temporary_name(path: str) -> str:
  """`DIR/.NAME.tmp-PID-w.EXT` beside `path` (the extension kept: writers infer the format)."""
  head, name = os.path.split(os.fspath(path))
  ext = os.path.splitext(name)[1]
  return os.path.join(head, f'.{name}.tmp-{os.getpid()}-w{ext}')


@contextlib.contextmanager
def atomic_file(path):
  """Yields a temporary path beside `path`; it becomes `path` only if the block succeeds."""
  tmp = temporary_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path, obj) -> None:
  """Writes `obj` as JSON atomically (`atomic_file`)."""
  with atomic_file(path) as tmp, open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')


def swap_into_place(tmp, final) -> None:
  """Renames the finished directory `tmp` to `final`; an existing `final` is first renamed
  aside (`.NAME.old-PID`) and removed only after the swap, so `final` is never missing
  half-way."""
  import shutil

  tmp, final = os.fspath(tmp), os.fspath(final)
  if os.path.lexists(final):
    head, name = os.path.split(final)
    old = os.path.join(head, f'.{name}.old-{os.getpid()}')
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_directory(final, *, overwrite: bool = False, error=UserError):
  """Yields a new hidden sibling directory (a `Path`) that becomes `final` only if the block
  succeeds; `error` (a UserError class) when `final` exists and not `overwrite`."""
  from pathlib import Path

  from disa_jax import integrity

  final = Path(final).expanduser().absolute()
  if final.exists() and not overwrite:
    raise error(f'output {final} already exists; choose another path or remove it')
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = integrity.temporary_dir(final)     # also removes those of killed earlier writes
  try:
    yield tmp
    swap_into_place(tmp, final)
  except BaseException:
    remove_tree(tmp)
    raise


def remove_tree(path, attempts: int = 25, settle: float = 0.2) -> None:
  """Removes directory `path` and everything in it. A library that failed a write (orbax,
  tensorstore) may still have writes in flight that re-create files (and their parent
  directories) just after the error reaches us, so the removal is repeated until the path
  stays absent for `settle` seconds."""
  import shutil
  import time

  for _ in range(attempts):
    shutil.rmtree(path, ignore_errors=True)
    time.sleep(settle)
    if not os.path.lexists(path):
      return


def mark_finished(directory) -> None:
  """Writes the output marker (`OUTPUT_MARKER`) that allows a later --overwrite to replace it."""
  write_json(os.path.join(directory, OUTPUT_MARKER), {'format': 'disa_jax.output'})


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
        mark_finished(self.path)
        swap_into_place(self.path, self.final)
      sharding.sync(f'disa_jax:renamed:{self._token}')
    finally:
      self._lock.release()
    return False


class ResumableDir:
  """A run output that survives interruption (`disa-eval`): work goes into `<out>.partial`,
  which is kept between invocations together with `run.json`, the run's fingerprint (what
  determines its results: model checksums, settings). Multi-process: every process calls
  `prepare` and `finish`; process 0 creates and renames, the others wait at barriers.

    rd = ResumableDir(out, overwrite=..., inputs=[...])   # path checks + lock, nothing written
    resumed = rd.prepare(fingerprint)   # True: continuing; UserError if the settings differ
    ... write into rd.path (each file atomically, e.g. `atomic_file`) ...
    rd.finish()                         # marker, rename to `out`
    rd.release()                        # (also on failure; `with rd:` does it)
  """

  RUN_FILE = 'run.json'
  SCRATCH_DIRS = ('images', 'shards')       # where a killed process may leave temporaries

  def __init__(self, out: str, *, overwrite: bool = False, inputs=()):
    import jax

    self.final = os.path.abspath(os.path.expanduser(out))
    self.path = self.final + '.partial'
    self.overwrite = overwrite
    self.is_main = jax.process_index() == 0
    check_output_path(self.final, overwrite=overwrite, inputs=inputs)
    self._lock = OutputLock(self.final)
    if self.is_main:
      self._lock.acquire()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def release(self) -> None:
    self._lock.release()

  def prepare(self, fingerprint: dict) -> bool:
    """Creates `<out>.partial` with `run.json`, or validates an interrupted run's; returns True
    when continuing it."""
    import shutil

    from disa_jax import integrity

    if os.path.exists(self.final) and not self.overwrite:
      raise UserError(f'output {self.final} already exists; pass --overwrite or choose another '
                      '--out')
    fp = json.loads(json.dumps(fingerprint, default=_json_default))
    run_json = os.path.join(self.path, self.RUN_FILE)
    old = None
    if os.path.exists(self.path) and not self.overwrite and os.path.exists(run_json):
      try:    # run.json is written atomically: unreadable means damaged, never half-written
        old = integrity.read_json(run_json, what='run fingerprint')
      except integrity.InvalidFileError as e:
        raise UserError(f'{e}; pass --overwrite to discard the interrupted run in '
                        f'{self.path}') from None
    if old is not None:
      if old != fp:
        diff = integrity.fingerprint_diff(old, fp)
        raise UserError(
          f'{self.path} holds an interrupted run with other settings ({"; ".join(diff)}); run '
          'the original command with the original files to continue it, or pass --overwrite to '
          'discard it')
      for sub in self.SCRATCH_DIRS:              # files a killed process was writing
        d = os.path.join(self.path, sub)
        for name in os.listdir(d) if os.path.isdir(d) else ():
          if '.tmp' in name:
            os.remove(os.path.join(d, name))
      return True
    if self.is_main:
      shutil.rmtree(self.path, ignore_errors=True)
      os.makedirs(self.path)
      write_json(run_json, fp)
    self._barrier('prepared')
    return False

  def finish(self) -> None:
    """Marks `<out>.partial` finished and renames it to `out` (process 0; a process on its own
    disk keeps its copy as `<out>.processN`)."""
    import jax

    self._barrier('scored')
    if self.is_main:
      mark_finished(self.path)
      swap_into_place(self.path, self.final)
    self._barrier('renamed')
    if not self.is_main and os.path.exists(self.path):      # per-host (not shared) filesystems
      os.replace(self.path, self.final + f'.process{jax.process_index()}')

  def _barrier(self, name: str) -> None:
    import jax

    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'disa_eval:{name}:{self.final}')


class FileSet:
  """Named result files `NAME.EXT` in one directory (`disa-evidence`): `check` refuses, before
  any work, a directory that is a file or files that exist without `overwrite`; `write(name,
  ext)` yields a temporary path that becomes the file when the block succeeds."""

  def __init__(self, out: str, overwrite: bool = False, exts=('json', 'png')):
    self.out, self.overwrite = os.path.abspath(os.path.expanduser(out)), overwrite
    self.exts = tuple(exts)

  def check(self, names) -> None:
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      raise UserError(f'--out {self.out} is a file; choose a directory')
    for n in names:
      for ext in self.exts:
        p = os.path.join(self.out, f'{n}.{ext}')
        if os.path.exists(p) and not self.overwrite:
          raise UserError(f'{p} already exists; pass --overwrite or choose another --out')

  def path(self, name: str, ext: str) -> str:
    """The final path (the directory is created; write it atomically, e.g. `write_json`)."""
    os.makedirs(self.out, exist_ok=True)
    return os.path.join(self.out, f'{name}.{ext}')

  @contextlib.contextmanager
  def write(self, name: str, ext: str):
    with atomic_file(self.path(name, ext)) as tmp:
      yield tmp


def prepare_workdir(final: str, partial: str, fp: dict, overwrite: bool) -> bool:
  """`ResumableDir.prepare` for a caller that holds the paths itself (no lock taken here):
  creates or validates `partial` = `<final>.partial`; True when continuing an earlier run."""
  import jax

  rd = ResumableDir.__new__(ResumableDir)
  rd.final, rd.path, rd.overwrite = final, partial, overwrite
  rd.is_main = jax.process_index() == 0
  return rd.prepare(fp)
