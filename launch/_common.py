"""Shared helpers of the launch scripts (standard library only: they run on a workstation).

Every script prints each command it runs (`+ cmd` on stderr), or with `--dry-run` prints the
exact commands on stdout (one per line, shell-quoted; `#` lines are notes) and runs nothing.
Bad input is reported as one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_VERSION = '0.10.2'
ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


class LaunchError(Exception):
  """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`error: ...; see PROG --help`) and exit status 2."""

  def error(self, message):
    print(f'error: {message}; see {self.prog} --help', file=sys.stderr)
    sys.exit(2)


def env_default(name: str, default=None):
  value = os.environ.get(name)
  return default if value in (None, '') else value


def add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--dry-run', action='store_true',
                      default=env_default('DISA_LAUNCH_DRY_RUN', '0') == '1',
                      help='print the commands instead of running them (env DISA_LAUNCH_DRY_RUN=1)')


def parse_env(pairs: list[str] | None) -> dict[str, str]:
  """['A=1', 'B=x y'] -> {'A': '1', 'B': 'x y'}; names must be shell identifiers."""
  out = {}
  for p in pairs or []:
    name, eq, value = p.partition('=')
    if not eq or not ENV_NAME.match(name):
      raise LaunchError(f'--env expects NAME=VALUE with NAME a shell variable name, got {p!r}')
    out[name] = value
  return out


def command_words(words: list[str]) -> list[str]:
  """The command after `--` (argparse REMAINDER), which must not be empty."""
  if words and words[0] == '--':
    words = words[1:]
  if not words:
    raise LaunchError('no command given; put it after --, e.g. -- disa-sample '
                      '--config=configs/mar_base.py:cpu')
  return list(words)


def with_compilation_cache(words: list[str], cache: str | None) -> list[str]:
  """Adds `--config.runtime.compilation_cache=CACHE` to a disa-* command that takes --config.

  A gs:// (or other URL) path is passed through untouched; JAX writes the cache there."""
  if not cache:
    return words
  if not any(w == '--config' or w.startswith('--config=') for w in words):
    raise LaunchError('--compilation-cache needs a command with --config=... (disa-sample, '
                      'disa-bench, ...); set JAX_COMPILATION_CACHE_DIR with --env otherwise')
  return [*words, f'--config.runtime.compilation_cache={cache}']


def env_words(env: dict[str, str]) -> list[str]:
  """`env A=1 B=2` prefix, so that printed and executed commands are the same list."""
  return ['env', *(f'{k}={v}' for k, v in env.items())] if env else []


class Runner:
  """Runs (or, when dry, prints) commands given as argument lists."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def note(self, text: str) -> None:
    print(f'# {text}', file=self.out if self.dry_run else sys.stderr, flush=True)

  def show(self, cmd: list[str]) -> None:
    if self.dry_run:
      print(shlex.join(cmd), file=self.out, flush=True)
    else:
      print(f'+ {shlex.join(cmd)}', file=sys.stderr, flush=True)

  def run(self, cmd: list[str], *, capture: bool = False) -> str:
    """Runs `cmd`; raises LaunchError if it fails. Returns its stdout when `capture`."""
    self.show(cmd)
    if self.dry_run:
      return ''
    try:
      r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    except FileNotFoundError:
      raise LaunchError(f'{cmd[0]} not found; install it or point the script at it') from None
    if r.returncode:
      raise LaunchError(f'{shlex.join(cmd[:6])}{" ..." if len(cmd) > 6 else ""} failed with '
                        f'exit status {r.returncode}')
    return r.stdout if capture else ''


  def call(self, cmd: list[str]) -> int:
    """Runs `cmd` in the foreground and returns its exit status (0 when dry)."""
    self.show(cmd)
    if self.dry_run:
      return 0
    try:
      return subprocess.run(cmd).returncode
    except FileNotFoundError:
      raise LaunchError(f'{cmd[0]} not found; install it or point the script at it') from None


def main(fn) -> None:
  """Runs `fn()`; LaunchError -> one `error:` line, exit 2; Ctrl-C -> exit 130."""
  try:
    sys.exit(fn() or 0)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
