"""Integrity of what the project writes and reads back: checksums, fingerprints, safe reads.

- Model directories (`checkpoint.save_model`): `checksums.json` holds the SHA-256 of every
  file under `params/` and of `model_config.json`, written last inside the temporary
  directory (so it is renamed into place with the rest). Loading verifies every listed file
  before orbax reads it: a truncated or altered parameter file is a one-line
  `CorruptModelError` naming the directory and the file. A directory written before checksums
  existed (no `checksums.json`) still loads, with a warning once per directory; its restored
  arrays are still checked to be finite (`check_finite_arrays`).
- Fingerprints of a run (`fingerprint_diff`): the model's checksum (`model_fingerprint`) and
  the result-relevant config fields, compared when a run resumes.
- `read_json`: a JSON file the project wrote (meta.json, config.json), with a one-line error
  naming the file when it is not valid JSON.
- Temporary siblings (`.NAME.tmp-PID-XXXX`) of an interrupted atomic write are removed by the
  next write of the same output (`temporary_dir`, `remove_stale_temporaries`).
- `write_error`: an OSError of a write (disk full, permission denied, read-only file system,
  a file where a directory should be) as a `OutputWriteError` carrying the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from disa_jax.errors import UserError

_log = logging.getLogger(__name__)


def warn(message: str) -> None:
  """A one-line `warning:` on stderr (and the log) for a safe fallback the user should know."""
  _log.debug(message)
  print(f'warning: {message}', file=sys.stderr, flush=True)

CHECKSUM_FILE = 'checksums.json'
CHECKSUM_FORMAT = 'disa_jax.checksums'
_CHUNK = 1 << 22


class CorruptModelError(UserError):
  """A model directory whose files do not match their checksums (or cannot be read)."""


class InvalidFileError(UserError):
  """A file of the project (JSON metadata, a shard) that cannot be parsed."""


class OutputWriteError(UserError):
  """A write failed for an environment reason (disk full, permission denied, ...)."""

  def __init__(self, message: str, path: str | None = None):
    super().__init__(message)
    self.path = path


# ------------------------------------------------------------------------------------------
# Checksums of model directories
def file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


MODEL_TREES = ('params', 'model_config.json')       # what a model directory's checksum covers
CHECKPOINT_TREES = ('state', 'data')                # a training checkpoint (orbax items)


def _covered_files(directory: Path, trees=MODEL_TREES) -> list[str]:
  """Relative paths of the files a checksum covers: the files and directory trees `trees`."""
  out = []
  for tree in trees:
    top = directory / tree
    if top.is_file():
      out.append(tree)
    elif top.is_dir():
      for root, _, names in os.walk(top):
        for name in names:
          out.append(os.path.relpath(os.path.join(root, name), directory))
  return sorted(out)


def compute_checksums(directory, trees=MODEL_TREES) -> dict[str, str]:
  """{relative path: sha256} of the covered files of a model directory (or of `trees`)."""
  directory = Path(directory)
  return {rel: file_sha256(directory / rel) for rel in _covered_files(directory, trees)}


def write_checksums(directory, trees=MODEL_TREES) -> dict[str, str]:
  """Writes `checksums.json` into `directory` (call it last, before the atomic rename)."""
  from disa_jax.io.output import write_json

  directory = Path(directory)
  files = compute_checksums(directory, trees)
  write_json(directory / CHECKSUM_FILE,
             {'format': CHECKSUM_FORMAT, 'algorithm': 'sha256', 'files': files})
  return files


def seal_checkpoint(step_dir) -> bool:
  """Writes `checksums.json` of a finished training checkpoint `checkpoints/<step>/` (its
  orbax items `state/` and `data/`) unless it has one; True when written."""
  step_dir = Path(step_dir)
  if not step_dir.is_dir() or (step_dir / CHECKSUM_FILE).exists():
    return False
  write_checksums(step_dir, CHECKPOINT_TREES)
  return True


def verify_checkpoint(step_dir) -> bool:
  """Checks a training checkpoint against its `checksums.json` (CorruptModelError naming the
  file); False for a checkpoint without one (written by an older version, or killed between
  orbax's save and the seal): then only the restored values are checked to be finite."""
  step_dir = Path(step_dir)
  if not (step_dir / CHECKSUM_FILE).exists():
    return False
  _verify_listing(step_dir, what='training checkpoint',
                  fix='the run resumes from the previous checkpoint')
  return True


_warned_unverified: set[str] = set()


def verify_checksums(directory) -> dict[str, str] | None:
  """Checks every file listed in `directory/checksums.json`; returns the listing, or None (with
  a warning, once per directory) for a directory written before checksums existed."""
  directory = Path(directory).expanduser()
  listing = directory / CHECKSUM_FILE
  if not listing.exists():
    key = str(directory.absolute())
    if key not in _warned_unverified:
      _warned_unverified.add(key)
      warn(f'{directory} has no {CHECKSUM_FILE} (written by an older version): its files are '
           'not verified, only its values checked to be finite; re-save it (disa-convert / '
           'disa-train --export) to add checksums')
    return None
  return _verify_listing(directory, what='model directory',
                         fix='re-create it (disa-convert / disa-train --export)')


def _verify_listing(directory: Path, *, what: str, fix: str) -> dict[str, str]:
  body = read_json(directory / CHECKSUM_FILE, what='checksum list')
  files = body.get('files') if isinstance(body, dict) else None
  if (not isinstance(body, dict) or body.get('format') != CHECKSUM_FORMAT
      or not isinstance(files, dict)):
    raise CorruptModelError(f'{what} {directory} has an invalid {CHECKSUM_FILE}; {fix}')
  for rel in sorted(files):
    if not (directory / rel).is_file():
      raise CorruptModelError(f'{what} {directory} is incomplete: {rel} is missing; {fix}')
  # a directory verified earlier in this process, unchanged since (same sizes and mtimes), is
  # not hashed again (loading then fingerprinting a 4 GB model reads it once)
  signature = (str(directory.absolute()), json.dumps(files, sort_keys=True),
               tuple((rel, *_stat_key(directory / rel)) for rel in sorted(files)))
  if signature in _verified:
    return files
  for rel, want in sorted(files.items()):
    if file_sha256(directory / rel) != want:
      raise CorruptModelError(
        f'{what} {directory} is corrupt: {rel} does not match its checksum (truncated or '
        f'altered); {fix}' + (' or copy it again' if what == 'model directory' else ''))
  _verified.add(signature)
  return files


_verified: set = set()


def _stat_key(path: Path) -> tuple[int, int]:
  st = path.stat()
  return st.st_size, st.st_mtime_ns


def model_fingerprint(directory) -> str:
  """One SHA-256 over the covered files of a model directory (its checksum listing when
  present and verified, else computed from the files)."""
  directory = Path(directory).expanduser()
  files = verify_checksums(directory) if (directory / CHECKSUM_FILE).exists() else None
  if files is None:
    files = compute_checksums(directory)
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def model_fingerprints(**directories) -> dict[str, str]:
  """{'<name>_sha256': model_fingerprint(dir)} for each non-empty directory argument
  (e.g. checkpoint=..., vae=..., inception=...); for the resume fingerprint of a run."""
  return {f'{name}_sha256': model_fingerprint(d) for name, d in directories.items()
          if d and Path(d).expanduser().is_dir()}


def check_finite_arrays(tree, where: str) -> None:
  """Raises `CorruptModelError` naming the first parameter of `tree` (nested dicts of arrays)
  holding NaN or Inf."""
  import jax

  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.asarray(leaf)
    if arr.dtype.kind == 'f' or arr.dtype.name == 'bfloat16':
      if not np.isfinite(np.asarray(arr, np.float32)).all():
        name = '.'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)
        raise CorruptModelError(
          f'model directory {where} holds non-finite values (NaN/Inf) in parameter {name}; it '
          'is corrupt or from a diverged run: re-create it (disa-convert / disa-train --export)')


# ------------------------------------------------------------------------------------------
# Fingerprints of runs
def fingerprint_diff(old: dict, new: dict, *, limit: int = 6) -> list[str]:
  """'key: was X, now Y' for each differing top-level key (values shortened)."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<absent>'), new.get(k, '<absent>')
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
      out.append(f'{k}: was {_short(a)}, now {_short(b)}')
  return out[:limit] + ([f'... ({len(out) - limit} more)'] if len(out) > limit else [])


# Config fields of a `disa-train` run that may differ when it is resumed (they do not change
# the updates already made nor, except `num_steps` with a cosine schedule, the next ones);
# a '*' entry covers a whole section. Every other field must be equal (docs: README training).
TRAIN_MAY_CHANGE_BASE = frozenset({
  'name', 'checkpoint', 'sampling.*', 'runtime.*', 'tokenizer.vae', 'tokenizer.dtype',
  'train.num_steps', 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
  'train.async_checkpointing', 'train.tensorboard', 'data.cache_dir',
})


def train_may_change() -> frozenset:
  """TRAIN_MAY_CHANGE_BASE + the model's result-neutral compute fields (`model.attn_splits`,
  from `systems.mar.model.RESULT_NEUTRAL_FIELDS`, the one list of them)."""
  from disa_jax.systems.mar.model import RESULT_NEUTRAL_FIELDS

  return TRAIN_MAY_CHANGE_BASE | {f'model.{f}' for f in RESULT_NEUTRAL_FIELDS}


def _flatten(tree, prefix: str = '') -> dict:
  out = {}
  for k, v in (tree or {}).items():
    key = f'{prefix}{k}'
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def config_diff(stored: dict, current: dict, *, may_change=frozenset()) -> list[str]:
  """'field: was X, now Y' for each (dotted) config field that differs between the stored
  and the current config, except those in `may_change` ('section.*' for a whole section)."""
  a, b = _flatten(stored), _flatten(current)
  out = []
  for k in sorted(set(a) | set(b)):
    if k in may_change or f'{k.split(".")[0]}.*' in may_change:
      continue
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
      out.append(f'{k}: was {_short(va)}, now {_short(vb)}')
  return out


def _short(v, n: int = 40) -> str:
  s = json.dumps(v, sort_keys=True, default=str)
  return s if len(s) <= n else s[:n - 3] + '...'


def discard_unreadable_npz(paths, *, required=()) -> list[str]:
  """Removes each `.npz` of `paths` that cannot be read completely (truncated, altered: the
  zip CRC of every member is checked by reading it) or lacks a `required` key, with a
  warning naming it; returns the removed paths (their work is then done again)."""
  import zipfile

  removed = []
  for path in paths:
    try:
      with np.load(path, allow_pickle=False) as data:
        missing = [k for k in required if k not in data.files]
        for k in data.files:
          data[k]
      reason = f'missing {", ".join(missing)}' if missing else ''
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      reason = e.__class__.__name__
    if reason:
      warn(f'discarding the unreadable shard {path} ({reason}); it is generated again')
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      removed.append(path)
  return removed


def purge_event_files(directory, after_step: int) -> int:
  """Drops the TensorBoard events with step > `after_step` from every event file in
  `directory` (and a record cut short by a kill), so a resumed run does not repeat steps.

  Event files are TFRecords (u64 length, u32 crc, Event proto, u32 crc); kept records are
  copied byte for byte. Returns the number of events dropped.
  """
  import struct

  from tensorboardX.proto import event_pb2

  directory = Path(directory)
  dropped = 0
  for path in sorted(directory.glob('events.out.tfevents.*')) if directory.is_dir() else ():
    data = path.read_bytes()
    kept, i, changed = [], 0, False
    while i < len(data):
      if i + 12 > len(data):
        changed = True
        break
      (n,) = struct.unpack('<Q', data[i:i + 8])
      end = i + 12 + n + 4
      if end > len(data):
        changed = True
        break
      try:
        ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      except Exception:  # noqa: BLE001 - protobuf DecodeError: a damaged record
        changed = True
        break
      if ev.HasField('summary') and ev.step > after_step:
        dropped += 1
        changed = True
      else:
        kept.append(data[i:end])
      i = end
    if changed:
      from disa_jax.io.output import atomic_file

      with atomic_file(path) as tmp:
        Path(tmp).write_bytes(b''.join(kept))
  return dropped


# ------------------------------------------------------------------------------------------
# Reading project files
def read_json(path, *, what: str = 'file'):
  """The parsed JSON of `path`, or a one-line `InvalidFileError` naming the file."""
  path = Path(path)
  try:
    text = path.read_text()
  except FileNotFoundError:
    raise InvalidFileError(f'{what} {path} does not exist') from None
  except (OSError, UnicodeDecodeError) as e:
    raise InvalidFileError(f'cannot read {what} {path}: {getattr(e, "strerror", None) or e}'
                           ) from None
  try:
    return json.loads(text)
  except ValueError as e:
    raise InvalidFileError(f'{what} {path} is not valid JSON ({e}); restore it or re-create '
                           'the directory') from None


# ------------------------------------------------------------------------------------------
# Temporary siblings of atomic writes
_TMP = re.compile(r'^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$')


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temporaries(final) -> list[Path]:
  """Removes `.NAME.tmp-PID-*` / `.NAME.old-PID` siblings of `final` left by a killed process
  (PID no longer running on this machine); returns what was removed."""
  final = Path(final)
  removed = []
  if not final.parent.is_dir():
    return removed
  for p in final.parent.iterdir():
    m = _TMP.match(p.name)
    if m and m.group('name') == final.name and not _alive(int(m.group('pid'))):
      shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
      removed.append(p)
  return removed


def temporary_dir(final) -> Path:
  """A new empty sibling directory `.NAME.tmp-PID-XXXX` of `final` (after removing stale
  ones of killed processes)."""
  final = Path(final)
  remove_stale_temporaries(final)
  return Path(tempfile.mkdtemp(prefix=f'.{final.name}.tmp-{os.getpid()}-', dir=final.parent))


# ------------------------------------------------------------------------------------------
# Environment errors of writes
WRITE_ERRNOS = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded',
                errno.EACCES: 'permission denied', errno.EPERM: 'operation not permitted',
                errno.EROFS: 'read-only file system', errno.ENOTDIR: 'a path component is a file',
                errno.EISDIR: 'is a directory', errno.EEXIST: 'already exists',
                errno.ENAMETOOLONG: 'name too long'}


def write_error(error: BaseException) -> OutputWriteError | None:
  """The one-line `OutputWriteError` for an environment error of a write, or None when
  `error` is not one (then it is a bug and keeps its traceback). Also recognises the errno
  text inside errors raised by libraries that wrap OSError (orbax, tensorstore)."""
  code = getattr(error, 'errno', None)
  path = getattr(error, 'filename', None)
  reason = WRITE_ERRNOS.get(code)
  if reason is None:
    text = str(error)
    for c, r in WRITE_ERRNOS.items():
      if c in (errno.EEXIST, errno.EISDIR, errno.EPERM):
        continue
      if os.strerror(c) in text or r in text.lower():
        reason, code = r, c
        break
  if reason is None:
    return None
  where = f' {path}' if path else ''
  fix = {errno.ENOSPC: 'free some space or write elsewhere',
         errno.EDQUOT: 'free some space or write elsewhere'}.get(
           code, 'choose a writable output path')
  return OutputWriteError(f'cannot write{where}: {reason}; {fix}', path)
