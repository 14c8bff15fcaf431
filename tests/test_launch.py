"""launch/tpu.py and launch/gpu.py: --help, the exact commands of --dry-run, real runs against
a fake gcloud, one-line errors, and the remote shell scripts executed with bash."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO

TPU, GPU = str(REPO / 'launch' / 'tpu.py'), str(REPO / 'launch' / 'gpu.py')
WHERE = ['--name=mar-pod', '--zone=us-central2-b']


def launch(script, *args, env=None, timeout=60):
  e = {k: v for k, v in os.environ.items()
       if not k.startswith(('DISA_TPU_', 'DISA_GCLOUD', 'DISA_LAUNCH', 'JAX_', 'XLA_PYTHON'))}
  e.update(env or {})
  return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=e,
                        timeout=timeout, cwd=REPO)


def dry(script, *args, env=None):
  r = launch(script, *args, '--dry-run', env=env) if '--' not in args else \
    launch(script, *args[:args.index('--')], '--dry-run', *args[args.index('--'):], env=env)
  assert r.returncode == 0, r.stderr
  return [ln for ln in r.stdout.splitlines() if not ln.startswith('#')]


def remote_command(line):
  """The --command=... script of a printed gcloud ssh command."""
  words = shlex.split(line)
  return next(w for w in words if w.startswith('--command='))[len('--command='):]


# ------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize('script,actions', [
  (TPU, ['create', 'setup', 'upload', 'run', 'fetch', 'stop', 'status', 'delete']),
  (GPU, ['single', 'node', 'spawn']),
])
def test_help(script, actions):
  r = launch(script, '--help')
  assert r.returncode == 0 and all(a in r.stdout for a in actions), r.stdout
  for a in actions:
    r = launch(script, a, '--help')
    assert r.returncode == 0 and '--dry-run' in r.stdout, (a, r.stdout)


def test_help_documents_env_vars():
  assert 'DISA_TPU_ZONE' in launch(TPU, '--help').stdout
  text = launch(GPU, '--help').stdout
  for var in ('XLA_PYTHON_CLIENT_MEM_FRACTION', 'JAX_COORDINATOR_ADDRESS', 'CUDA_VISIBLE_DEVICES'):
    assert var in text


# ------------------------------------------------------------------------------------------
# TPU dry runs: exact commands

def test_tpu_create():
  assert dry(TPU, 'create', *WHERE, '--accelerator-type=v4-32', '--spot') == [
    'gcloud compute tpus tpu-vm create mar-pod --accelerator-type=v4-32 '
    '--version=tpu-ubuntu2204-base --spot --zone=us-central2-b']
  lines = dry(TPU, 'create', *WHERE, '--accelerator-type=v5p-64', '--queued', '--spot',
              '--wait', '--project=proj')
  assert lines == [
    'gcloud compute tpus queued-resources create mar-pod --node-id=mar-pod '
    '--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --zone=us-central2-b '
    '--project=proj',
    "gcloud compute tpus queued-resources describe mar-pod '--format=value(state.state)' "
    '--zone=us-central2-b --project=proj']
  line, = dry(TPU, 'create', *WHERE, '--accelerator-type=v6e-8', '--version=custom-rt')
  assert '--accelerator-type=v6e-8 --version=custom-rt' in line


def test_tpu_settings_from_environment():
  env = {'DISA_TPU_NAME': 'envtpu', 'DISA_TPU_ZONE': 'europe-west4-a',
         'DISA_TPU_ACCELERATOR': 'v5litepod-16', 'DISA_TPU_PROJECT': 'p1'}
  assert dry(TPU, 'create', env=env) == [
    'gcloud compute tpus tpu-vm create envtpu --accelerator-type=v5litepod-16 '
    '--version=v2-alpha-tpuv5-lite --zone=europe-west4-a --project=p1']
  assert launch(TPU, 'delete', env={**env, 'DISA_LAUNCH_DRY_RUN': '1'}).stdout.splitlines() == [
    'gcloud compute tpus tpu-vm delete envtpu --quiet --zone=europe-west4-a --project=p1']


def test_tpu_setup_copy_and_git():
  scp, ssh = dry(TPU, 'setup', *WHERE, '--extra-pip=gcsfs')
  assert scp.startswith('gcloud compute tpus tpu-vm scp ') and 'mar-pod:disa_jax-src.tar.gz' in scp
  assert '--worker=all --zone=us-central2-b' in scp
  assert ssh.startswith('gcloud compute tpus tpu-vm ssh mar-pod --worker=all ')
  script = remote_command(ssh)
  for part in ('tar -xzf "$HOME"/disa_jax-src.tar.gz -C "$HOME"/disa_jax',
               'python3.11 -m venv "$HOME"/disa_venv',
               "pip install -q 'jax[tpu]==0.10.2' -r requirements.txt -e . gcsfs",
               'apt-get install -y -q python3.11 python3.11-venv'):
    assert part in script, script
  subprocess.run(['bash', '-n', '-c', script], check=True)
  ssh, = dry(TPU, 'setup', *WHERE, '--source=git', '--git-url=https://example.org/d.git',
             '--commit=abc123', '--worker=0')
  script = remote_command(ssh)
  assert '--worker=0' in ssh
  assert 'git clone -q https://example.org/d.git "$HOME"/disa_jax' in script
  assert 'checkout -q abc123' in script and "'jax[tpu]==0.10.2'" in script
  subprocess.run(['bash', '-n', '-c', script], check=True)


def test_tpu_run_on_all_workers():
  ssh, = dry(TPU, 'run', *WHERE, '--compilation-cache=gs://bkt/xla', '--env=TFDS_DATA_DIR=gs://d',
             '--run-name=s50k', '--', 'disa-sample', '--config=configs/mar_base.py',
             '--num-images=50000', '--out=outputs/mar_b_50k')
  assert ssh.startswith('gcloud compute tpus tpu-vm ssh mar-pod --worker=all ')
  assert ssh.endswith('--zone=us-central2-b')
  script = remote_command(ssh)
  assert script == (
    'set -o pipefail; cd "$HOME"/disa_jax && mkdir -p "$HOME"/disa_logs && '
    'env DISA_JAX_DISTRIBUTED=1 TFDS_DATA_DIR=gs://d JAX_COMPILATION_CACHE_DIR=gs://bkt/xla '
    'PATH="$HOME"/disa_venv/bin:"$PATH" disa-sample --config=configs/mar_base.py '
    '--num-images=50000 --out=outputs/mar_b_50k '
    '--config.runtime.compilation_cache=gs://bkt/xla '
    '2>&1 | tee "$HOME"/disa_logs/s50k-"$(hostname)".log')
  ssh, = dry(TPU, 'run', *WHERE, '--detach', '--no-distributed', '--', 'nvidia-smi')
  script = remote_command(ssh)
  assert 'nohup env PATH=' in script and 'DISA_JAX_DISTRIBUTED' not in script
  subprocess.run(['bash', '-n', '-c', script], check=True)


def test_tpu_run_script_executes(tmp_path):
  """The remote run script, run by bash with a fake $HOME: right directory, environment,
  arguments (quoting intact) and a per-host log file."""
  home = tmp_path / 'home'
  (home / 'disa_jax').mkdir(parents=True)
  bin_dir = home / 'disa_venv' / 'bin'
  bin_dir.mkdir(parents=True)
  fake = bin_dir / 'disa-sample'
  fake.write_text('#!/bin/sh\necho "cwd=$(pwd) dist=$DISA_JAX_DISTRIBUTED x=$X_VAR"\n'
                  'for a in "$@"; do echo "arg=$a"; done\nexit 3\n')
  fake.chmod(0o755)
  ssh, = dry(TPU, 'run', *WHERE, '--env=X_VAR=a b', '--run-name=t', '--', 'disa-sample',
             "--classes=1, 2", '--config=c.py')
  r = subprocess.run(['bash', '-c', remote_command(ssh)], capture_output=True, text=True,
                     env={'HOME': str(home), 'PATH': os.environ['PATH']})
  assert r.returncode == 3                                  # pipefail keeps the exit status
  expected = [f'cwd={home}/disa_jax dist=1 x=a b', 'arg=--classes=1, 2', 'arg=--config=c.py']
  assert r.stdout.splitlines() == expected
  logs = list((home / 'disa_logs').glob('t-*.log'))
  assert len(logs) == 1 and logs[0].read_text().splitlines() == expected


def test_tpu_fetch_and_stop():
  lines = dry(TPU, 'fetch', *WHERE, '--remote=outputs/x', '--workers=all', '--num-workers=3',
              '--local=got')
  assert lines == ['mkdir -p got'] + [
    f'gcloud compute tpus tpu-vm scp --recurse mar-pod:disa_jax/outputs/x got --worker={i} '
    '--zone=us-central2-b' for i in range(3)]
  assert dry(TPU, 'fetch', *WHERE, '--remote=/data/out')[1].startswith(
    'gcloud compute tpus tpu-vm scp --recurse mar-pod:/data/out fetched/mar-pod --worker=0')
  ssh, = dry(TPU, 'stop', *WHERE)
  script = remote_command(ssh)
  assert '--worker=all' in ssh and "pkill -TERM -f \"$HOME\"/'[d]isa_venv/bin/'" in script
  subprocess.run(['bash', '-n', '-c', script], check=True)


def test_tpu_upload():
  assert dry(TPU, 'upload', *WHERE, f'--local={REPO / "configs"}', '--dest=ckpt') == [
    "gcloud compute tpus tpu-vm ssh mar-pod --worker=all '--command=mkdir -p "
    '"$HOME"/disa_jax/ckpt\' --zone=us-central2-b',
    f'gcloud compute tpus tpu-vm scp --recurse {REPO / "configs"} mar-pod:disa_jax/ckpt/ '
    '--worker=all --zone=us-central2-b']


def test_tpu_status_and_delete():
  assert dry(TPU, 'status', *WHERE) == [
    'gcloud compute tpus tpu-vm describe mar-pod --zone=us-central2-b']
  assert dry(TPU, 'delete', *WHERE, '--queued') == [
    'gcloud compute tpus queued-resources delete mar-pod --force --quiet --zone=us-central2-b']


# ------------------------------------------------------------------------------------------
# TPU: real runs against a fake gcloud

@pytest.fixture
def fake_gcloud(tmp_path):
  log = tmp_path / 'gcloud.jsonl'
  script = tmp_path / 'gcloud'
  script.write_text(
    f'#!{sys.executable}\nimport json, os, sys\n'
    f'open({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
    'if "describe" in sys.argv:\n'
    '  print(json.dumps({"networkEndpoints": [{}, {}, {}]}))\n'
    'sys.exit(int(os.environ.get("FAKE_GCLOUD_RC", "0")))\n')
  script.chmod(0o755)

  def calls():
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []

  return str(script), calls


def test_tpu_setup_really_packs_and_copies(fake_gcloud, tmp_path):
  gcloud, calls = fake_gcloud
  r = launch(TPU, 'setup', *WHERE, f'--gcloud={gcloud}')
  assert r.returncode == 0, r.stderr
  scp, ssh = calls()
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and ssh[3] == 'ssh'
  with tarfile.open(scp[4]) as tf:
    names = set(tf.getnames())
  assert {'setup.cfg', 'requirements.txt', 'disa_jax/sharding.py', 'launch/tpu.py'} <= names
  assert not any(n.startswith(('.venv/', '.git/', 'outputs/')) or '__pycache__' in n
                 for n in names)
  assert '+ ' in r.stderr and 'packed' in r.stderr          # commands echoed when running


def test_tpu_fetch_all_asks_gcloud_for_workers(fake_gcloud, tmp_path):
  gcloud, calls = fake_gcloud
  r = launch(TPU, 'fetch', *WHERE, f'--gcloud={gcloud}', '--remote=outputs/x', '--workers=all',
             f'--local={tmp_path / "got"}')
  assert r.returncode == 0, r.stderr
  describe, *scps = calls()
  assert describe[3] == 'describe' and [c[-2] for c in scps] == [
    '--worker=0', '--worker=1', '--worker=2']
  assert (tmp_path / 'got').is_dir()


def test_tpu_failing_gcloud_is_one_line_error(fake_gcloud):
  gcloud, calls = fake_gcloud
  r = launch(TPU, 'delete', *WHERE, f'--gcloud={gcloud}', env={'FAKE_GCLOUD_RC': '3'})
  assert r.returncode == 2 and len(calls()) == 1
  assert r.stderr.splitlines()[-1].startswith('error: ') and 'exit status 3' in r.stderr
  r = launch(TPU, 'status', *WHERE, '--gcloud=/no/such/gcloud')
  assert r.returncode == 2 and 'error: /no/such/gcloud not found' in r.stderr


@pytest.mark.parametrize('args,message', [
  (['create', '--zone=us-central2-b', '--accelerator-type=v4-8'], 'no TPU name'),
  (['create', '--name=Bad_Name', '--zone=us-central2-b'], "TPU name 'Bad_Name' is invalid"),
  (['create', '--name=t', '--zone=uscentral'], "zone 'uscentral' is invalid"),
  (['create', *WHERE], 'no accelerator type'),
  (['create', *WHERE, '--accelerator-type=v4'], "accelerator type 'v4' is invalid"),
  (['create', *WHERE, '--accelerator-type=v5e-16'], 'named v5litepod-N'),
  (['create', *WHERE, '--accelerator-type=v9x-8'], 'no default TPU runtime for v9x'),
  (['create', *WHERE, '--accelerator-type=v4-8', '--spot', '--preemptible'], 'exclude each other'),
  (['run', *WHERE], 'no command given'),
  (['run', *WHERE, '--env=1X=2', '--', 'disa-sample'], '--env expects NAME=VALUE'),
  (['run', *WHERE, '--compilation-cache=gs://b/x', '--', 'ls'], 'needs a command with --config'),
  (['run', *WHERE, '--worker=two', '--', 'ls'], '--worker must be all or a worker number'),
  (['fetch', *WHERE], '--remote PATH is required'),
  (['fetch', *WHERE, '--remote=o', '--workers=x'], '--workers must be all or worker numbers'),
  (['fetch', *WHERE, '--remote=o', '--workers=all'], 'needs --num-workers N'),
  (['setup', *WHERE, '--source=git'], '--source=git needs --git-url'),
  (['upload', *WHERE, '--local=/no/such/ckpt'], '/no/such/ckpt does not exist'),
  (['setup', *WHERE, '--source=svn'], "invalid choice: 'svn'"),
  (['launch'], "invalid choice: 'launch'"),
])
def test_tpu_bad_input_one_line(args, message):
  r = launch(TPU, *args, '--dry-run') if '--' not in args else \
    launch(TPU, *args[:args.index('--')], '--dry-run', *args[args.index('--'):])
  assert r.returncode == 2, r
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr
  assert r.stdout == ''


# ------------------------------------------------------------------------------------------
# GPU

def test_gpu_single_and_node():
  assert dry(GPU, 'single', '--mem-fraction=0.9', '--gpus=0,1', '--compilation-cache=/nfs/xla',
             '--', 'disa-sample', '--config=configs/mar_base.py') == [
    'env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0,1 '
    'JAX_COMPILATION_CACHE_DIR=/nfs/xla JAX_PLATFORMS=cuda disa-sample '
    '--config=configs/mar_base.py --config.runtime.compilation_cache=/nfs/xla']
  assert dry(GPU, 'node', '--coordinator=10.0.0.1:1234', '--num-nodes=2', '--node-rank=1',
             '--no-preallocate', '--', 'disa-sample', '--config=c.py') == [
    'env XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda '
    'JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 '
    'disa-sample --config=c.py']
  env = {'JAX_COORDINATOR_ADDRESS': 'n0:99', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
  line, = dry(GPU, 'node', '--', 'disa-sample', env=env)
  assert 'JAX_COORDINATOR_ADDRESS=n0:99 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=3' in line
  line, = dry(GPU, 'node', '--slurm', '--', 'disa-sample')
  assert 'DISA_JAX_DISTRIBUTED=1' in line and 'JAX_COORDINATOR' not in line


def test_gpu_spawn_dry_run():
  lines = dry(GPU, 'spawn', '--processes=2', '--gpus=4,5,6,7', '--gpus-per-process=2',
              '--port=5555', '--', 'disa-sample', '--config=c.py')
  assert lines == [
    f'env CUDA_VISIBLE_DEVICES={g} JAX_PLATFORMS=cuda JAX_COORDINATOR_ADDRESS=127.0.0.1:5555 '
    f'JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} disa-sample --config=c.py'
    for i, g in enumerate(['4,5', '6,7'])]
  lines = dry(GPU, 'spawn', '--processes=3', '--cpu-devices=2', '--', 'prog')
  assert len(lines) == 3 and all('JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_'
                                 'count=2' in ln for ln in lines)


def test_gpu_spawn_runs_waits_and_stops(tmp_path):
  ok = launch(GPU, 'spawn', '--processes=2', '--cpu-devices=1', f'--log-dir={tmp_path}', '--',
              sys.executable, '-c', 'import os; print("id", os.environ["JAX_PROCESS_ID"], '
              'os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"])')
  assert ok.returncode == 0, ok.stderr
  for i in (0, 1):
    assert (tmp_path / f'process-{i}.log').read_text().startswith(f'id {i} 2 127.0.0.1:')
  # One process fails: the other (sleeping) one is stopped, the failure's status is returned.
  t0 = time.monotonic()
  bad = launch(GPU, 'spawn', '--processes=2', '--cpu-devices=1', '--', sys.executable, '-c',
               'import os, sys, time\nif os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
               'time.sleep(60)')
  assert bad.returncode == 3 and 'process 1 exited with status 3' in bad.stderr
  assert time.monotonic() - t0 < 30
  slow = launch(GPU, 'spawn', '--processes=2', '--cpu-devices=1', '--timeout=1', '--',
                sys.executable, '-c', 'import time; time.sleep(60)')
  assert slow.returncode == 124 and 'timed out' in slow.stderr


@pytest.mark.parametrize('args,message', [
  (['single'], 'no command given'),
  (['single', '--mem-fraction=1.5', '--', 'x'], '--mem-fraction must be in (0, 1]'),
  (['single', '--gpus=a,b', '--', 'x'], '--gpus must be GPU numbers'),
  (['node', '--', 'x'], 'node needs --coordinator'),
  (['node', '--coordinator=h', '--num-nodes=2', '--node-rank=0', '--', 'x'], 'HOST:PORT'),
  (['node', '--coordinator=h:1', '--num-nodes=2', '--node-rank=2', '--', 'x'], 'rank must be'),
  (['spawn', '--processes=0', '--', 'x'], '--processes must be >= 1'),
  (['spawn', '--processes=4', '--gpus=0,1', '--', 'x'], 'need more'),
  (['single', '--compilation-cache=/c', '--', 'ls'], 'needs a command with --config'),
  (['spawn', '--processes=two'], "invalid int value: 'two'"),
])
def test_gpu_bad_input_one_line(args, message):
  r = launch(GPU, *args, '--dry-run') if '--' not in args else \
    launch(GPU, *args[:args.index('--')], '--dry-run', *args[args.index('--'):])
  assert r.returncode == 2, r
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr
