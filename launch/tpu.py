#!/usr/bin/env python3
"""Cloud TPU VMs and pod slices for disa_jax: create, set up, run on all workers, fetch, delete.

Runs `gcloud` on your workstation (standard library only; nothing to install):

  python3 launch/tpu.py create --name=mar --zone=us-central2-b --accelerator-type=v4-32
  python3 launch/tpu.py setup  --name=mar --zone=us-central2-b            # copy repo + install
  python3 launch/tpu.py upload --name=mar --zone=us-central2-b --local=ckpt/mar_base --dest=ckpt
  python3 launch/tpu.py run    --name=mar --zone=us-central2-b \\
      --compilation-cache=gs://BUCKET/xla -- disa-sample --config=configs/mar_base.py ...
  python3 launch/tpu.py fetch  --name=mar --zone=us-central2-b --remote=outputs/x --workers=all
  python3 launch/tpu.py delete --name=mar --zone=us-central2-b

`run` executes the command on every worker (`--worker=all`) inside the repo copy, with the
venv on PATH and DISA_JAX_DISTRIBUTED=1, so `disa_jax.sharding.maybe_initialize_distributed`
calls `jax.distributed.initialize()` (Cloud TPU detects the coordinator itself); each worker
tees its output to LOG_DIR/RUN-<hostname>.log. Every subcommand has --dry-run, which prints
the exact commands instead of running them. Defaults come from environment variables:
DISA_TPU_NAME, DISA_TPU_ZONE, DISA_TPU_PROJECT, DISA_TPU_ACCELERATOR, DISA_TPU_RUNTIME,
DISA_TPU_REMOTE_DIR (disa_jax), DISA_TPU_VENV (disa_venv), DISA_TPU_PYTHON (python3.11),
DISA_GCLOUD (gcloud), DISA_LAUNCH_DRY_RUN=1. See docs/launch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
  JAX_VERSION,
  REPO,
  LaunchError,
  Parser,
  Runner,
  add_common,
  command_words,
  env_default,
  main,
  parse_env,
  with_compilation_cache,
)

# Recommended TPU software (runtime) versions for JAX, by TPU generation.
RUNTIMES = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
            'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
            'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
NAME_RE = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
ZONE_RE = re.compile(r'^[a-z]+-[a-z]+[0-9]+-[a-z]$')
ACCEL_RE = re.compile(r'^(v[0-9]+[a-z]*)-([0-9]+)$')
REMOTE_TARBALL = 'disa_jax-src.tar.gz'
# Local files never copied to the workers (besides everything git ignores).
SKIP_DIRS = {'.git', '.venv', 'venv', 'outputs', 'scratch', '__pycache__', '.pytest_cache',
             '.ruff_cache', 'build', 'dist'}


# ------------------------------------------------------------------------------------------
# Validation and command building

def check_name(name):
  if not name:
    raise LaunchError('no TPU name; pass --name NAME or set DISA_TPU_NAME')
  if not NAME_RE.match(name):
    raise LaunchError(f'TPU name {name!r} is invalid: use lowercase letters, digits and '
                      'hyphens, starting with a letter (at most 63 characters)')


def check_zone(zone):
  if not zone:
    raise LaunchError('no zone; pass --zone ZONE (e.g. us-central2-b) or set DISA_TPU_ZONE')
  if not ZONE_RE.match(zone):
    raise LaunchError(f'zone {zone!r} is invalid; expected e.g. us-central2-b or europe-west4-a')


def runtime_for(accelerator: str, runtime: str | None) -> str:
  m = ACCEL_RE.match(accelerator or '')
  if not m:
    raise LaunchError(f'accelerator type {accelerator!r} is invalid; expected e.g. v4-32, '
                      'v5p-64, v5litepod-16 or v6e-8')
  family = m.group(1)
  if family == 'v5e':
    raise LaunchError('TPU v5e slices are named v5litepod-N (e.g. v5litepod-16)')
  if runtime:
    return runtime
  if family not in RUNTIMES:
    raise LaunchError(f'no default TPU runtime for {family}; pass --version (see '
                      'https://cloud.google.com/tpu/docs/runtimes)')
  return RUNTIMES[family]


def remote_path(path: str) -> str:
  """A remote path as a shell word: relative paths are under $HOME on the worker."""
  if path.startswith('~/'):
    path = path[2:]
  if not path or path in ('~', '.'):
    raise LaunchError('remote paths must name a directory under $HOME or an absolute path')
  return shlex.quote(path) if path.startswith('/') else f'"$HOME"/{shlex.quote(path)}'


def scp_path(path: str) -> str:
  """A remote path for scp (relative to the home directory)."""
  return path[2:] if path.startswith('~/') else path


def under_repo(args, path: str) -> str:
  """`path` on the workers for scp: absolute, ~/..., or relative to the repo copy."""
  if path.startswith(('/', '~/')):
    return scp_path(path)
  repo = scp_path(args.remote_dir).rstrip('/')
  return repo if path in ('', '.') else f'{repo}/{path.strip("/")}'


class Tpu:
  """gcloud commands for one TPU VM / pod slice."""

  def __init__(self, args):
    check_name(args.name)
    check_zone(args.zone)
    worker = getattr(args, 'worker', 'all')
    if worker != 'all' and not worker.isdigit():
      raise LaunchError(f'--worker must be all or a worker number, got {worker!r}')
    self.args = args
    self.gcloud = args.gcloud
    self.where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])

  def tpu_vm(self, verb, *rest):
    return [self.gcloud, 'compute', 'tpus', 'tpu-vm', verb, self.args.name, *rest, *self.where]

  def queued(self, verb, *rest):
    return [self.gcloud, 'compute', 'tpus', 'queued-resources', verb, self.args.name, *rest,
            *self.where]

  def ssh(self, script: str, worker: str = 'all'):
    return self.tpu_vm('ssh', f'--worker={worker}', f'--command={script}')

  def scp(self, src: str, dst: str, worker: str, *, recurse=False):
    return [self.gcloud, 'compute', 'tpus', 'tpu-vm', 'scp', *(['--recurse'] if recurse else []),
            src, dst, f'--worker={worker}', *self.where]


def install_script(args) -> str:
  """Shell (one line) that creates the venv once and installs disa_jax for TPU into it."""
  py, venv, repo = args.python, remote_path(args.venv), remote_path(args.remote_dir)
  if not re.match(r'^[A-Za-z0-9_./-]+$', py):
    raise LaunchError(f'--python {py!r} is not a plain interpreter name or path')
  apt = ''
  if re.match(r'^python3\.[0-9]+$', py):
    apt = (f'if ! command -v {py} >/dev/null; then sudo apt-get update -q && '
           f'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {py} {py}-venv; fi; ')
  extra = ' '.join(shlex.quote(p) for p in args.extra_pip or [])
  return (apt + f'if [ ! -x {venv}/bin/python ]; then {py} -m venv {venv}; fi; '
          f'{venv}/bin/pip install -q --upgrade pip; '
          f'cd {repo} && {venv}/bin/pip install -q {shlex.quote(args.jax_spec)} '
          f'-r requirements.txt -e .{" " + extra if extra else ""}; '
          f'{venv}/bin/python -c "import jax, disa_jax; print(\'disa_jax ready, jax\', '
          f'jax.__version__)"')


def source_files(repo: str) -> list[str]:
  """Files to copy: git's tracked and untracked-but-not-ignored files, else a filtered walk."""
  try:
    out = subprocess.run(['git', '-C', repo, 'ls-files', '-co', '--exclude-standard', '-z'],
                         capture_output=True, check=True).stdout.decode()
    files = [f for f in out.split('\0') if f and os.path.isfile(os.path.join(repo, f))]
  except (OSError, subprocess.CalledProcessError):
    files = []
    for root, dirs, names in os.walk(repo):
      dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith('.egg-info'))
      files += [os.path.relpath(os.path.join(root, n), repo) for n in sorted(names)]
  files = [f for f in files if not set(f.split('/')[:-1]) & SKIP_DIRS]
  if 'setup.cfg' not in files:
    raise LaunchError(f'{repo} does not look like the disa_jax repository (no setup.cfg)')
  return files


def pack(repo: str, tarball: str) -> int:
  files = source_files(repo)
  with tarfile.open(tarball, 'w:gz') as tf:
    for f in files:
      tf.add(os.path.join(repo, f), arcname=f, recursive=False)
  return len(files)


# ------------------------------------------------------------------------------------------
# Subcommands

def cmd_create(args, r: Runner):
  tpu = Tpu(args)
  if not args.accelerator_type:
    raise LaunchError('no accelerator type; pass --accelerator-type (e.g. v4-32) or set '
                      'DISA_TPU_ACCELERATOR')
  runtime = runtime_for(args.accelerator_type, args.version)
  if args.spot and args.preemptible:
    raise LaunchError('--spot and --preemptible exclude each other; use --spot')
  if args.queued and args.preemptible:
    raise LaunchError('queued resources take --spot, not --preemptible')
  opts = (['--spot'] if args.spot else []) + (['--preemptible'] if args.preemptible else []) + \
    (['--reserved'] if args.reserved else [])
  accel = f'--accelerator-type={args.accelerator_type}'
  if not args.queued:
    r.run(tpu.tpu_vm('create', accel, f'--version={runtime}', *opts))
    return
  r.run(tpu.queued('create', f'--node-id={args.name}', accel, f'--runtime-version={runtime}',
                   *opts))
  if not args.wait:
    r.note(f'check the request with: {sys.argv[0]} status --queued --name={args.name} '
           f'--zone={args.zone}')
    return
  describe = tpu.queued('describe', '--format=value(state.state)')
  r.note(f'polled every 30 s until the state is ACTIVE (at most {args.wait_minutes} min)')
  if r.dry_run:
    r.show(describe)
    return
  deadline = time.time() + 60 * args.wait_minutes
  while True:
    state = r.run(describe, capture=True).strip()
    print(f'queued resource {args.name}: {state}', file=sys.stderr)
    if state == 'ACTIVE':
      return
    if state in ('FAILED', 'SUSPENDED'):
      raise LaunchError(f'queued resource {args.name} is {state}; see `{shlex.join(describe)}`')
    if time.time() > deadline:
      raise LaunchError(f'queued resource {args.name} still {state} after {args.wait_minutes} '
                        'min; check again with `status --queued`')
    time.sleep(30)


def cmd_setup(args, r: Runner):
  tpu = Tpu(args)
  repo = remote_path(args.remote_dir)
  install = install_script(args)
  if args.source == 'copy':
    local = os.path.abspath(args.repo)
    tarball = os.path.join(tempfile.gettempdir(), f'disa_jax-{args.name}.tar.gz')
    if r.dry_run:
      r.note(f'pack the files listed by `git -C {local} ls-files -co --exclude-standard` into '
             f'{tarball}')
    else:
      n = pack(local, tarball)
      r.note(f'packed {n} files from {local} into {tarball}')
    r.run(tpu.scp(tarball, f'{args.name}:{REMOTE_TARBALL}', args.worker))
    tb = remote_path(REMOTE_TARBALL)
    script = (f'set -euo pipefail; mkdir -p {repo}; tar -xzf {tb} -C {repo}; rm -f {tb}; '
              + install)
  else:
    if not args.git_url:
      raise LaunchError('--source=git needs --git-url URL (and --commit REF)')
    url, ref = shlex.quote(args.git_url), shlex.quote(args.commit)
    script = (f'set -euo pipefail; if [ -d {repo}/.git ]; then git -C {repo} fetch -q origin; '
              f'else git clone -q {url} {repo}; fi; git -C {repo} checkout -q {ref}; ' + install)
  r.run(tpu.ssh(script, args.worker))


def run_script(args, words: list[str]) -> str:
  env = {'DISA_JAX_DISTRIBUTED': '1'} if args.distributed else {}
  env.update(parse_env(args.env))
  if args.compilation_cache:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', args.compilation_cache)
  words = with_compilation_cache(words, args.compilation_cache)
  if not re.match(r'^[A-Za-z0-9_.-]+$', args.run_name):
    raise LaunchError(f'--run-name {args.run_name!r} may only hold letters, digits, . _ -')
  logs, venv = remote_path(args.log_dir), remote_path(args.venv)
  log = f'{logs}/{args.run_name}-"$(hostname)".log'
  assigns = [f'{k}={shlex.quote(v)}' for k, v in env.items()] + [f'PATH={venv}/bin:"$PATH"']
  cmd = ' '.join(['env', *assigns, shlex.join(words)])
  head = f'cd {remote_path(args.remote_dir)} && mkdir -p {logs} && '
  if args.detach:
    return (head + f'nohup {cmd} > {log} 2>&1 < /dev/null & '
            f'echo "started on $(hostname), log: {args.log_dir}/{args.run_name}-$(hostname).log"')
  return 'set -o pipefail; ' + head + f'{cmd} 2>&1 | tee {log}'


def cmd_run(args, r: Runner):
  tpu = Tpu(args)
  words = command_words(args.command)
  r.run(tpu.ssh(run_script(args, words), args.worker))


def parse_workers(spec: str) -> list[int] | None:
  """'all' -> None (every worker); '0' or '0,2' -> [0] / [0, 2]."""
  if spec == 'all':
    return None
  try:
    ids = [int(x) for x in spec.split(',') if x.strip()]
  except ValueError:
    ids = []
  if not ids or any(i < 0 for i in ids):
    raise LaunchError(f'--workers must be all or worker numbers like 0 or 0,1,3, got {spec!r}')
  return ids


def cmd_fetch(args, r: Runner):
  tpu = Tpu(args)
  if not args.remote:
    raise LaunchError('--remote PATH is required (an output directory on the workers, relative '
                      f'to {args.remote_dir} unless absolute)')
  workers = parse_workers(args.workers)
  if workers is None:
    if args.num_workers:
      workers = list(range(args.num_workers))
    elif r.dry_run:
      raise LaunchError('fetch --workers=all with --dry-run needs --num-workers N (a real run '
                        'reads it from `gcloud compute tpus tpu-vm describe`)')
    else:
      info = json.loads(r.run(tpu.tpu_vm('describe', '--format=json'), capture=True) or '{}')
      workers = list(range(len(info.get('networkEndpoints', [])) or 1))
  remote = under_repo(args, args.remote)
  local = args.local or os.path.join('fetched', args.name)
  r.run(['mkdir', '-p', local])
  r.note(f'files of all workers are merged into {local}/{os.path.basename(remote.rstrip("/"))} '
         '(images are named by global id, so they never collide)')
  for w in workers:
    r.run(tpu.scp(f'{args.name}:{scp_path(remote)}', local, str(w), recurse=True))


def cmd_upload(args, r: Runner):
  """Copies a local file or directory (e.g. converted checkpoints) to the workers."""
  tpu = Tpu(args)
  if not args.local:
    raise LaunchError('upload needs --local PATH (e.g. a converted checkpoint directory)')
  if not os.path.exists(args.local):
    raise LaunchError(f'{args.local} does not exist')
  dest = under_repo(args, args.dest)
  r.run(tpu.ssh(f'mkdir -p {remote_path(dest)}', args.worker))
  r.run(tpu.scp(args.local.rstrip('/'), f'{args.name}:{dest}/', args.worker,
                recurse=os.path.isdir(args.local)))


def cmd_stop(args, r: Runner):
  tpu = Tpu(args)
  venv = args.venv[2:] if args.venv.startswith('~/') else args.venv
  base = os.path.basename(venv.rstrip('/'))
  # '[d]isa_venv' matches the venv path but not this pkill command line itself.
  pattern = os.path.join(os.path.dirname(venv), f'[{base[0]}]{base[1:]}', 'bin', '')
  pat = shlex.quote(pattern) if venv.startswith('/') else f'"$HOME"/{shlex.quote(pattern)}'
  script = (f'if pkill -TERM -f {pat}; then sleep 5; pkill -KILL -f {pat} || true; fi; '
            'echo "no disa_jax processes left on $(hostname)"')
  r.run(tpu.ssh(script, args.worker))


def cmd_status(args, r: Runner):
  tpu = Tpu(args)
  r.run(tpu.queued('describe') if args.queued else tpu.tpu_vm('describe'))


def cmd_delete(args, r: Runner):
  tpu = Tpu(args)
  if args.queued:
    r.run(tpu.queued('delete', '--force', '--quiet'))
  else:
    r.run(tpu.tpu_vm('delete', '--quiet'))


# ------------------------------------------------------------------------------------------

def build_parser() -> Parser:
  p = Parser(prog='launch/tpu.py', description=__doc__,
             formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='action', required=True, metavar='ACTION')

  def add(name, fn, help_):
    s = sub.add_parser(name, help=help_, description=help_)
    s.set_defaults(fn=fn)
    s.add_argument('--name', default=env_default('DISA_TPU_NAME'),
                   help='TPU VM / pod slice name (env DISA_TPU_NAME)')
    s.add_argument('--zone', default=env_default('DISA_TPU_ZONE'),
                   help='zone, e.g. us-central2-b (env DISA_TPU_ZONE)')
    s.add_argument('--project', default=env_default('DISA_TPU_PROJECT'),
                   help='GCP project (env DISA_TPU_PROJECT; default: gcloud config)')
    s.add_argument('--gcloud', default=env_default('DISA_GCLOUD', 'gcloud'),
                   help='gcloud executable (env DISA_GCLOUD)')
    add_common(s)
    return s

  def remote_opts(s):
    s.add_argument('--remote-dir', default=env_default('DISA_TPU_REMOTE_DIR', 'disa_jax'),
                   help='repo copy on each worker, relative to $HOME (env DISA_TPU_REMOTE_DIR)')
    s.add_argument('--venv', default=env_default('DISA_TPU_VENV', 'disa_venv'),
                   help='virtualenv on each worker, relative to $HOME (env DISA_TPU_VENV)')
    s.add_argument('--worker', default='all', help='worker(s) to use: all (default) or a number')

  s = add('create', cmd_create, 'create a TPU VM or pod slice (directly or as a queued resource)')
  s.add_argument('--accelerator-type', default=env_default('DISA_TPU_ACCELERATOR'),
                 help='e.g. v4-8, v4-32, v5p-64, v5litepod-16, v6e-8 (env DISA_TPU_ACCELERATOR)')
  s.add_argument('--version', default=env_default('DISA_TPU_RUNTIME'),
                 help='TPU runtime (env DISA_TPU_RUNTIME); default by generation: '
                 + ', '.join(f'{k}: {v}' for k, v in RUNTIMES.items()))
  s.add_argument('--spot', action='store_true', help='Spot VMs (preemptible, cheaper)')
  s.add_argument('--preemptible', action='store_true', help='legacy preemptible TPU VMs')
  s.add_argument('--reserved', action='store_true', help='use reserved capacity')
  s.add_argument('--queued', action='store_true',
                 help='request through queued resources (id = --name) instead of tpu-vm create')
  s.add_argument('--wait', action='store_true', help='with --queued: wait until ACTIVE')
  s.add_argument('--wait-minutes', type=int, default=120, help='how long --wait waits')

  s = add('setup', cmd_setup, 'copy (or git clone) the repo to every worker and install it '
          'into a venv with jax[tpu]')
  remote_opts(s)
  s.add_argument('--source', choices=('copy', 'git'), default='copy',
                 help='copy: pack this checkout (git-tracked and untracked, not ignored files) '
                 'and scp it; git: clone --git-url at --commit on each worker')
  s.add_argument('--repo', default=REPO, help='local checkout to copy (default: this one)')
  s.add_argument('--git-url', help='repository URL for --source=git')
  s.add_argument('--commit', default='HEAD', help='commit / tag / branch for --source=git')
  s.add_argument('--python', default=env_default('DISA_TPU_PYTHON', 'python3.11'),
                 help='interpreter for the venv (>= 3.11; python3.X is apt-installed if '
                 'missing; env DISA_TPU_PYTHON)')
  s.add_argument('--jax-spec', default=f'jax[tpu]=={JAX_VERSION}',
                 help='pip requirement for JAX on TPU')
  s.add_argument('--extra-pip', action='append', metavar='REQ',
                 help='extra pip requirement (repeatable), e.g. gcsfs for a gs:// '
                 'compilation cache')

  s = add('run', cmd_run, 'run a command (e.g. disa-sample ...) on all workers at once')
  remote_opts(s)
  s.add_argument('--env', action='append', metavar='NAME=VALUE',
                 help='environment variable for the command (repeatable)')
  s.add_argument('--compilation-cache', metavar='DIR',
                 help='persistent XLA cache: a gs:// bucket path shared by all workers, or a '
                 'worker-local directory; added as --config.runtime.compilation_cache')
  s.add_argument('--log-dir', default='disa_logs',
                 help='log directory on each worker, relative to $HOME')
  s.add_argument('--run-name', default=time.strftime('run-%Y%m%d-%H%M%S'),
                 help='log file prefix: LOG_DIR/RUN_NAME-<hostname>.log')
  s.add_argument('--no-distributed', dest='distributed', action='store_false',
                 help='do not set DISA_JAX_DISTRIBUTED=1 (commands that are not JAX jobs)')
  s.add_argument('--detach', action='store_true',
                 help='start in the background with nohup and return (survives ssh drops)')
  s.add_argument('command', nargs=argparse.REMAINDER, help='-- COMMAND ARGS...')

  s = add('fetch', cmd_fetch, 'copy an output directory back from worker 0 or all workers')
  remote_opts(s)
  s.add_argument('--remote', help='directory on the workers (relative to --remote-dir)')
  s.add_argument('--local', help='local parent directory (default fetched/NAME)')
  s.add_argument('--workers', default='0', help='0 (default), all, or a list like 0,2')
  s.add_argument('--num-workers', type=int, default=0,
                 help='number of workers for --workers=all (default: ask gcloud describe)')

  s = add('upload', cmd_upload, 'copy a local file or directory (e.g. converted checkpoints) '
          'to every worker')
  remote_opts(s)
  s.add_argument('--local', help='file or directory to copy')
  s.add_argument('--dest', default='.',
                 help='directory on the workers that receives it, keeping its name (relative '
                 'to --remote-dir unless absolute; default: the repo copy)')

  s = add('stop', cmd_stop, 'stop disa_jax processes (started from the venv) on the workers')
  remote_opts(s)

  s = add('status', cmd_status, 'describe the TPU VM (or the queued resource)')
  s.add_argument('--queued', action='store_true', help='describe the queued resource')

  s = add('delete', cmd_delete, 'delete the TPU VM (or the queued resource and its TPU)')
  s.add_argument('--queued', action='store_true', help='delete the queued resource')
  return p


def run(argv=None):
  args = build_parser().parse_args(argv)
  return args.fn(args, Runner(args.dry_run))


if __name__ == '__main__':
  main(run)
