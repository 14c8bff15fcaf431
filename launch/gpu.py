#!/usr/bin/env python3
"""Run a disa_jax command on GPUs: one host with all its GPUs, one node of a multi-node job,
or several local processes forming one JAX job.

  # one process, every local GPU (JAX shards the batch over all of them)
  python3 launch/gpu.py single --mem-fraction=0.9 -- disa-sample --config=configs/mar_base.py ...
  # on each of N nodes (or from SLURM: --slurm), one process per node
  python3 launch/gpu.py node --coordinator=node0:12345 --num-nodes=2 --node-rank=0 -- disa-sample ...
  # N local processes, one per GPU (or, with --cpu-devices K, K fake CPU devices each)
  python3 launch/gpu.py spawn --processes=2 --cpu-devices=2 -- disa-sample --config=configs/mar_base.py:tiny

Multi-process jobs are formed by `disa_jax.sharding.maybe_initialize_distributed`, which
reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (set here), or
DISA_JAX_DISTRIBUTED=1 to let JAX detect a SLURM / Open MPI job. Memory and device options
become documented environment variables: XLA_PYTHON_CLIENT_MEM_FRACTION (--mem-fraction),
XLA_PYTHON_CLIENT_PREALLOCATE=false (--no-preallocate), CUDA_VISIBLE_DEVICES (--gpus),
JAX_PLATFORMS; anything else with --env NAME=VALUE. Every subcommand has --dry-run, which
prints the exact commands (as `env NAME=VALUE ... COMMAND`) instead of running them.
See docs/launch.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
  LaunchError,
  Parser,
  Runner,
  add_common,
  command_words,
  env_default,
  env_words,
  main,
  parse_env,
  with_compilation_cache,
)


def base_env(args) -> dict[str, str]:
  """Environment variables common to every process, from the options."""
  env = {}
  if args.mem_fraction is not None:
    if not 0.0 < args.mem_fraction <= 1.0:
      raise LaunchError(f'--mem-fraction must be in (0, 1], got {args.mem_fraction}')
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{args.mem_fraction:g}'
  if not args.preallocate:
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  if args.gpus:
    if not re.match(r'^[0-9]+(,[0-9]+)*$', args.gpus):
      raise LaunchError(f'--gpus must be GPU numbers like 0,1,2,3, got {args.gpus!r}')
    env['CUDA_VISIBLE_DEVICES'] = args.gpus
  if args.compilation_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = args.compilation_cache
  env.update(parse_env(args.env))
  return env


def the_command(args) -> list[str]:
  return with_compilation_cache(command_words(args.command), args.compilation_cache)


def cmd_single(args, r: Runner):
  env = base_env(args)
  env.setdefault('JAX_PLATFORMS', 'cuda')
  return r.call(env_words(env) + the_command(args))


def coordinator_env(address: str, num: int, rank: int) -> dict[str, str]:
  if not re.match(r'^[A-Za-z0-9_.:\[\]-]+:[0-9]+$', address or ''):
    raise LaunchError(f'the coordinator must be HOST:PORT, got {address!r}')
  if num < 1:
    raise LaunchError(f'the number of processes must be >= 1, got {num}')
  if not 0 <= rank < num:
    raise LaunchError(f'the process rank must be in [0, {num}), got {rank}')
  return {'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': str(num),
          'JAX_PROCESS_ID': str(rank)}


def cmd_node(args, r: Runner):
  env = base_env(args)
  env.setdefault('JAX_PLATFORMS', 'cuda')
  if args.slurm:
    env['DISA_JAX_DISTRIBUTED'] = '1'   # jax.distributed reads the SLURM_* variables
  else:
    if args.coordinator is None or args.num_nodes is None or args.node_rank is None:
      raise LaunchError('node needs --coordinator HOST:PORT, --num-nodes N and --node-rank I '
                        '(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or '
                        '--slurm')
    env.update(coordinator_env(args.coordinator, int(args.num_nodes), int(args.node_rank)))
  return r.call(env_words(env) + the_command(args))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def spawn_envs(args) -> list[dict[str, str]]:
  n = args.processes
  if n < 1:
    raise LaunchError(f'--processes must be >= 1, got {n}')
  port = args.port or free_port()
  envs = []
  for i in range(n):
    env = base_env(args)
    if args.cpu_devices:
      if args.cpu_devices < 1:
        raise LaunchError(f'--cpu-devices must be >= 1, got {args.cpu_devices}')
      env['JAX_PLATFORMS'] = 'cpu'
      flags = os.environ.get('XLA_FLAGS', '')
      flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', flags).strip()
      env['XLA_FLAGS'] = (flags + f' --xla_force_host_platform_device_count='
                          f'{args.cpu_devices}').strip()
    else:
      env.setdefault('JAX_PLATFORMS', 'cuda')
      g = args.gpus_per_process
      visible = [str(d) for d in range(i * g, (i + 1) * g)]
      if args.gpus:
        pool = args.gpus.split(',')
        if len(pool) < n * g:
          raise LaunchError(f'--gpus {args.gpus} has {len(pool)} GPUs; {n} processes x {g} '
                            'need more')
        visible = pool[i * g:(i + 1) * g]
      env['CUDA_VISIBLE_DEVICES'] = ','.join(visible)
    env.update(coordinator_env(f'127.0.0.1:{port}', n, i))
    envs.append(env)
  return envs


def cmd_spawn(args, r: Runner):
  """Starts N processes, waits for all; if one fails (or --timeout passes) stops the rest."""
  words = the_command(args)
  envs = spawn_envs(args)
  cmds = [env_words(e) + words for e in envs]
  if args.log_dir:
    r.note(f'process i writes {args.log_dir}/process-i.log')
  if args.workdir_per_process:
    r.note(f'process i runs in {args.workdir_per_process}/process-i (its own disk view)')
  for c in cmds:
    r.show(c)
  if r.dry_run:
    return 0
  procs, logs = [], []
  try:
    for i, c in enumerate(cmds):
      cwd = None
      if args.workdir_per_process:
        cwd = os.path.join(args.workdir_per_process, f'process-{i}')
        os.makedirs(cwd, exist_ok=True)
      out = None
      if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        out = open(os.path.join(args.log_dir, f'process-{i}.log'), 'w')
        logs.append(out)
      procs.append(subprocess.Popen(c, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out
                                    else None, start_new_session=True))
    return _wait_all(procs, args.timeout)
  except FileNotFoundError as e:
    raise LaunchError(f'cannot start {words[0]}: {e.strerror}') from None
  finally:
    _stop(procs)
    for f in logs:
      f.close()


def _wait_all(procs, timeout: float) -> int:
  deadline = time.monotonic() + timeout if timeout else None
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, c = failed[0]
      print(f'process {i} exited with status {c}; stopping the others', file=sys.stderr)
      return c
    if all(c == 0 for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      print(f'timed out after {timeout:g} s; stopping all processes', file=sys.stderr)
      return 124
    time.sleep(0.2)


def _stop(procs, grace: float = 5.0) -> None:
  """SIGTERM (then SIGKILL) to each still-running process group started here."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  end = time.monotonic() + grace
  for p in alive:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def build_parser() -> Parser:
  p = Parser(prog='launch/gpu.py', description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='action', required=True, metavar='ACTION')

  def add(name, fn, help_):
    s = sub.add_parser(name, help=help_, description=help_)
    s.set_defaults(fn=fn)
    add_common(s)
    s.add_argument('--mem-fraction', type=float,
                   default=env_default('XLA_PYTHON_CLIENT_MEM_FRACTION'),
                   help='fraction of GPU memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION;'
                   ' JAX default 0.75)')
    s.add_argument('--no-preallocate', dest='preallocate', action='store_false',
                   help='allocate GPU memory on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false)')
    s.add_argument('--gpus', default=None,
                   help='GPUs to use, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES; default all)')
    s.add_argument('--env', action='append', metavar='NAME=VALUE',
                   help='extra environment variable (repeatable)')
    s.add_argument('--compilation-cache', metavar='DIR',
                   help='persistent XLA cache directory (shared filesystem or gs://), added as '
                   '--config.runtime.compilation_cache')
    return s

  s = add('single', cmd_single, 'one process using every local GPU')
  s.add_argument('command', nargs=argparse.REMAINDER, help='-- COMMAND ARGS...')

  s = add('node', cmd_node, 'one process of a multi-node job (run it on every node)')
  s.add_argument('--coordinator', default=env_default('JAX_COORDINATOR_ADDRESS'),
                 help='HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)')
  s.add_argument('--num-nodes', type=int, default=env_default('JAX_NUM_PROCESSES'),
                 help='number of processes (env JAX_NUM_PROCESSES)')
  s.add_argument('--node-rank', type=int, default=env_default('JAX_PROCESS_ID'),
                 help='this process, 0..N-1; 0 hosts the coordinator (env JAX_PROCESS_ID)')
  s.add_argument('--slurm', action='store_true',
                 help='let JAX read the SLURM_* variables (DISA_JAX_DISTRIBUTED=1)')
  s.add_argument('command', nargs=argparse.REMAINDER, help='-- COMMAND ARGS...')

  s = add('spawn', cmd_spawn, 'N local processes forming one JAX job (one per GPU, or fake '
          'CPU devices to rehearse a multi-host run)')
  s.add_argument('--processes', type=int, default=2, help='number of processes (default 2)')
  s.add_argument('--gpus-per-process', type=int, default=1, help='GPUs per process (default 1)')
  s.add_argument('--cpu-devices', type=int, default=0,
                 help='run on the CPU with this many fake devices per process')
  s.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
  s.add_argument('--log-dir', help='write process i output to LOG_DIR/process-i.log')
  s.add_argument('--workdir-per-process', metavar='DIR',
                 help='run process i in DIR/process-i (simulates hosts with their own disks)')
  s.add_argument('--timeout', type=float, default=0,
                 help='stop all processes after this many seconds (exit status 124)')
  s.add_argument('command', nargs=argparse.REMAINDER, help='-- COMMAND ARGS...')
  return p


def run(argv=None):
  args = build_parser().parse_args(argv)
  return args.fn(args, Runner(args.dry_run))


if __name__ == '__main__':
  main(run)
