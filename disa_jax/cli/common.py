"""Shared command-line plumbing: config loading, one-line errors, runtime setup, outputs.

Every entry point uses absl flags with `--config=FILE[:ARG]` (ml_collections) plus
`--config.a.b=value` overrides. Flag names accept dashes or underscores (`--num-images` and
`--num_images`). Errors the user can fix are raised as `CliError` and printed as one line
starting with `error:`; the process exits with status 2 and leaves no partial output.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags

from disa_jax import integrity
from disa_jax.errors import UserError
from disa_jax.io.output import OutputDir, write_json  # noqa: F401  (re-exported)


class CliError(UserError):
  """A user error: printed as one line, exit status 2."""


USER_ERRORS = (UserError, FileNotFoundError)


def normalize_argv(argv: list[str]) -> list[str]:
  """`--num-images=3` -> `--num_images=3` (absl wants underscores); `--config.*` untouched."""
  out = []
  for a in argv:
    if a.startswith('--') and not a.startswith('--config.'):
      name, eq, value = a[2:].partition('=')
      a = '--' + name.replace('-', '_') + eq + value
    out.append(a)
  return out


def main(run_fn: Callable[[list[str]], None], *, doc: str | None = None):
  """Runs an absl app whose body raises `UserError` (or FileNotFoundError) for bad input:
  printed as one `error:` line, exit status 2. `--help` prints `doc` (default: the docstring
  of `run_fn`'s module) and the command's own flags."""

  def wrapped(argv):
    try:
      run_fn(argv)
    except USER_ERRORS as e:
      _print_error(e)
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
  if any(a in ('--help', '-h', '--helpshort', '-?') for a in sys.argv[1:]):
    module = sys.modules.get(run_fn.__module__)
    print(help_text(doc if doc is not None else getattr(module, '__doc__', '') or ''))
    sys.exit(0)
  app.run(wrapped, flags_parser=_parse_flags)


def _print_error(e: BaseException) -> None:
  msg = str(e).strip() or e.__class__.__name__
  if isinstance(e, FileNotFoundError) and e.filename:
    msg = f'{e.strerror or "no such file"}: {e.filename}'
  first, *rest = msg.splitlines()
  print(f'error: {first}', file=sys.stderr)
  for line in rest:
    print(f'  {line.strip()}', file=sys.stderr)


def help_text(doc: str) -> str:
  """The command's docstring and its flags (those defined by disa_jax modules)."""
  lines = [doc.strip(), '', 'flags:']
  seen = set()
  for module, module_flags in sorted(flags.FLAGS.flags_by_module_dict().items()):
    own = ('disa_jax' in module or module in ('__main__', sys.argv[0])
           or module.endswith('.py'))
    if not (own or 'ml_collections' in module):
      continue
    for f in sorted(module_flags, key=lambda f: f.name):
      if f.name in seen or (('ml_collections' in module) and f.name != 'config'):
        continue
      seen.add(f.name)
      default = '' if f.default is None else f' (default: {f.default_as_str})'
      lines.append(f'  --{f.name}: {f.help}{default}')
  lines.append('')
  lines.append('Flags accept dashes or underscores (--num-images, --num_images); config fields '
               'are overridden with --config.SECTION.FIELD=VALUE.')
  return '\n'.join(lines)


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
    print(f'error: {_one_line(e)}', file=sys.stderr)
    print(f'Try --help for the flags of {os.path.basename(argv[0])}.', file=sys.stderr)
    sys.exit(2)
  except (UserError, KeyError, AttributeError, TypeError, ValueError, OSError,
          SyntaxError) as e:   # config file / override problems raised while parsing
    override = _bad_override(argv, e)
    if override:
      print(f'error: unknown config field in {override}; override a field the config file '
            'has (see its sections)', file=sys.stderr)
    else:
      print(f'error: config: {_last_line(e)}', file=sys.stderr)
    sys.exit(2)


def _bad_override(argv, e: BaseException) -> str:
  """The `--config.a.b=v` argument an AttributeError / KeyError of the config points at."""
  if not isinstance(e, KeyError | AttributeError):
    return ''
  import re

  names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(e).split('\n')[0])
  for arg in argv:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].partition('=')[0].split('.')
      if any(n in path for n in names):
        return arg
  return ''


def _last_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[-1] if lines else e.__class__.__name__


def _one_line(e: BaseException) -> str:
  text = str(e).strip().strip('"\'') or e.__class__.__name__
  return text.splitlines()[0]


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


def config_value(holder):
  """The parsed `--config` (None when absent); a file that failed to load is a UserError."""
  try:
    value = holder.value
    if value is not None:
      value.keys()   # ml_collections reports a load failure lazily, on first access
    return value
  except Exception as e:
    raise UserError(f'config: {_last_line(e)}') from None


def check_config_type(config) -> None:
  """A config was given and is a ConfigDict (CliError otherwise)."""
  import ml_collections

  if config is None:
    raise CliError('no config given; pass --config=configs/mar/base.py (or another file in '
                   'configs/)')
  if not isinstance(config, ml_collections.ConfigDict):
    raise CliError(f'the config file\'s get_config() returned {type(config).__name__}, not an '
                   'ml_collections.ConfigDict')


def check_config(config) -> None:
  """A config was given, is a ConfigDict, and names a known system (`config.system`)."""

  from disa_jax.systems.base import system_of

  check_config_type(config)
  system_of(config)

  from disa_jax.validation import validate_config

  validate_config(config)        # ranges and finiteness of every numeric field


def parse_int_list(text: str, name: str) -> list[int]:
  if not text:
    return []
  try:
    return [int(x) for x in text.replace(' ', '').split(',') if x]
  except ValueError:
    raise CliError(f'{name} must be comma-separated integers, got {text!r}') from None
