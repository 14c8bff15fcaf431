"""Multi-host plumbing: distributed init from the environment, the compilation cache path,
and a real two-process JAX job on the CPU (jax.distributed over loopback, gloo collectives)
running disa-sample through launch/gpu.py spawn."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO
from PIL import Image

from disa_jax import sharding as shd
from disa_jax.cli import common

# ------------------------------------------------------------------------------------------
# Environment -> jax.distributed arguments


def test_distributed_args_single_process_by_default():
  assert shd.distributed_args({}) is None
  assert shd.distributed_args({'DISA_JAX_DISTRIBUTED': '0'}) is None


def test_distributed_args_auto_detect_and_explicit():
  assert shd.distributed_args({'DISA_JAX_DISTRIBUTED': '1'}) == {}
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  assert shd.distributed_args(env) == dict(coordinator_address='10.0.0.2:1234',
                                           num_processes=4, process_id=3)


@pytest.mark.parametrize('env,message', [
  ({'JAX_COORDINATOR_ADDRESS': 'h:1'}, 'JAX_NUM_PROCESSES, JAX_PROCESS_ID missing'),
  ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'}, 'JAX_COORDINATOR_ADDRESS missing'),
  ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
   'must be integers'),
  ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
   'JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES=2)'),
  ({'JAX_COORDINATOR_ADDRESS': 'h', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'},
   'must be host:port'),
  ({'DISA_JAX_DISTRIBUTED': 'yes'}, 'DISA_JAX_DISTRIBUTED must be 0 or 1'),
])
def test_distributed_args_errors(env, message):
  with pytest.raises(shd.DistributedConfigError, match='.*') as e:
    shd.distributed_args(env)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_single_process_collectives_are_identities():
  assert shd.any_process(True) and not shd.any_process(False)
  assert shd.broadcast_int(7) == 7
  shd.sync('noop')
  mesh = shd.make_mesh(2)
  keys = jax.random.split(jax.random.key(0), 4)
  put = shd.put({'k': keys, 'x': np.arange(4)}, shd.batch_sharded(mesh))
  assert put['x'].sharding == shd.batch_sharded(mesh)
  np.testing.assert_array_equal(jax.random.key_data(put['k']), jax.random.key_data(keys))
  np.testing.assert_array_equal(shd.gather_rows(put['x']), np.arange(4))


# ------------------------------------------------------------------------------------------
# Persistent compilation cache location


def test_compilation_cache_local_path_is_created(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert common.compilation_cache_dir('') == ''
  got = common.compilation_cache_dir('~/a/b/xla')
  assert got == str(tmp_path / 'a' / 'b' / 'xla') and os.path.isdir(got)
  got = common.compilation_cache_dir(f'file://{tmp_path}/c')
  assert got == str(tmp_path / 'c') and os.path.isdir(got)


def test_compilation_cache_bucket_passed_through(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name in ('gcsfs', 'fsspec') else real(name))
  assert common.compilation_cache_dir('gs://bucket/xla') == 'gs://bucket/xla'
  assert os.listdir(tmp_path) == []                    # nothing created locally
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
  with pytest.raises(common.CliError, match='needs the gcsfs package; pip install gcsfs'):
    common.compilation_cache_dir('gs://bucket/xla')
  with pytest.raises(common.CliError, match='unsupported scheme hdfs://'):
    common.compilation_cache_dir('hdfs://x/y')


@pytest.mark.skipif(importlib.util.find_spec('gcsfs') is not None,
                    reason='gcsfs installed: a gs:// cache would be used for real')
def test_cli_bucket_cache_without_gcsfs_is_one_line_error(tmp_path):
  from test_cli import TINY, _env

  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.sample', TINY, '--noprogress',
                      '--config.runtime.compilation_cache=gs://bucket/xla',
                      f'--out={tmp_path / "o"}'], capture_output=True, text=True, env=_env(),
                     cwd=REPO, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: compilation cache gs://bucket/xla '
                                                      'needs the gcsfs package')
  assert 'Traceback' not in r.stderr and not (tmp_path / 'o').exists()


@pytest.mark.parametrize('env,message', [
  ({'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1'},
   'error: JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID missing'),
  ({'DISA_JAX_DISTRIBUTED': '1'},   # no cluster to detect on this machine
   'error: jax.distributed.initialize failed with cluster auto-detection'),
])
def test_bad_distributed_env_is_one_line_error(tmp_path, env, message):
  from test_cli import TINY, _env

  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.sample', TINY, '--noprogress',
                      f'--out={tmp_path / "o"}'], capture_output=True, text=True,
                     env={**_env(), **env}, cwd=REPO, timeout=300)
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert message in r.stderr and not (tmp_path / 'o').exists()


# ------------------------------------------------------------------------------------------
# A real two-process job: 2 processes x 2 CPU devices, one global mesh of 4 devices.

NUM_IMAGES, BATCH = 10, 8       # the 2nd batch is mostly padding: process 1 has no real row
SAMPLE_ARGS = ['--config.model.vae_embed_dim=3', '--config.tokenizer.kind=pixels',
               f'--num-images={NUM_IMAGES}', f'--batch-size={BATCH}', '--num-iter=2',
               '--classes=1,2,3', '--seed=5', '--save-tokens', '--noprogress']


def _spawn(out, log_dir, *extra, workdirs=None, timeout=420):
  cmd = [sys.executable, str(REPO / 'launch' / 'gpu.py'), 'spawn', '--processes=2',
         '--cpu-devices=2', f'--log-dir={log_dir}', f'--timeout={timeout - 20}',
         *([f'--workdir-per-process={workdirs}'] if workdirs else []), '--',
         sys.executable, '-m', 'disa_jax.cli.sample', f'--config={REPO}/configs/mar_base.py:tiny',
         f'--out={out}', f'--config.runtime.compilation_cache={CACHE}', *SAMPLE_ARGS, *extra]
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'DISA_JAX'))}
  env['PYTHONPATH'] = str(REPO)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=REPO)


def _logs(log_dir):
  return '\n'.join(f'--- {p}\n{p.read_text()}' for p in sorted(log_dir.glob('*.log')))


def _reference(tmp_path):
  """The same job as one process (8 devices here): tokens and labels."""
  import disa_jax.cli.sample as sample_mod  # noqa: F401  (defines the CLI flags once)

  spec = importlib.util.spec_from_file_location('mar_base_cfg', REPO / 'configs' / 'mar_base.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config('tiny')
  with config.unlocked():
    config.model.vae_embed_dim = 3
    config.tokenizer.kind = 'pixels'
    config.sampling.update(num_images=NUM_IMAGES, batch_size=BATCH, num_iter=2, classes='1,2,3',
                           seed=5)
  out = tmp_path / 'reference'
  from disa_jax.cli.sample import sample

  sample(config, str(out), save_tokens=True, show_progress=False)
  return np.load(out / 'tokens.npy'), np.load(out / 'labels.npy'), out


def _watch(path, stop):
  """Lists `path` the first moment it exists (to check that it appears complete)."""
  seen = []
  while not stop.is_set() and not seen:
    if os.path.isdir(path):
      seen.append(sorted(os.listdir(path)))
      images = os.path.join(path, 'images')
      seen.append(sorted(os.listdir(images)) if os.path.isdir(images) else [])
    time.sleep(0.01)
  return seen


def _check_images(images_dir, ids, ref_tokens):
  from disa_jax.config import TINY_MODEL, tokenizer_config
  from disa_jax.systems.mar.model import MARConfig
  from disa_jax.tokenizers.image import PixelTokenizer

  expected = PixelTokenizer(MARConfig.from_dict({**TINY_MODEL, 'vae_embed_dim': 3}),
                            scale=tokenizer_config().scale)
  expected = expected.decode(ref_tokens)
  for i in ids:
    np.testing.assert_array_equal(np.asarray(Image.open(images_dir / f'{i:06d}.png')),
                                  expected[i])


def test_two_processes_one_shared_output_dir(tmp_path):
  """Both processes write into one directory (same machine / shared filesystem)."""
  out, logs = tmp_path / 'mp', tmp_path / 'logs'
  stop, seen = threading.Event(), []
  watcher = threading.Thread(target=lambda: seen.extend(_watch(str(out), stop)))
  watcher.start()
  proc = _spawn(out, logs)
  try:
    _, err = proc.communicate(timeout=420)
  finally:
    proc.kill()
    stop.set()
    watcher.join()
  assert proc.returncode == 0, err + _logs(logs)
  # The directory appeared complete (renamed from out.partial after every process finished).
  top, images = seen
  assert top == ['.disa_jax-output', 'grid.png', 'images', 'labels.npy', 'metrics.json',
                 'tokens.npy'], seen
  assert images == [f'{i:06d}.png' for i in range(NUM_IMAGES)]
  assert not list(tmp_path.glob('*.partial'))
  m = json.loads((out / 'metrics.json').read_text())
  assert m['processes'] == 2 and m['devices'] == 4 and m['data_parallel'] == 4
  assert m['num_images'] == NUM_IMAGES
  log0, log1 = (logs / 'process-0.log').read_text(), (logs / 'process-1.log').read_text()
  assert f'{NUM_IMAGES} images in' in log0 and 'images in' not in log1   # process 0 reports

  ref_tokens, ref_labels, _ = _reference(tmp_path)
  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (NUM_IMAGES, 16, 3)
  np.testing.assert_array_equal(tokens, ref_tokens)      # same images as one process
  assert not np.allclose(tokens[0], tokens[3])           # (different images differ)
  np.testing.assert_array_equal(np.load(out / 'labels.npy'), ref_labels)
  _check_images(out / 'images', range(NUM_IMAGES), ref_tokens)


@pytest.mark.slow
def test_two_processes_own_disks(tmp_path):
  """Each process sees only its own disk (a TPU pod): each finalises its own directory with
  only its images; only process 0 writes tokens, labels, grid and metrics. An output that
  exists on one process stops every process with the same one-line error."""
  work, logs = tmp_path / 'hosts', tmp_path / 'logs'
  proc = _spawn('outputs/run', logs, workdirs=work)
  _, err = proc.communicate(timeout=420)
  assert proc.returncode == 0, err + _logs(logs)
  d0, d1 = work / 'process-0' / 'outputs' / 'run', work / 'process-1' / 'outputs' / 'run'
  assert sorted(os.listdir(d0)) == ['.disa_jax-output', 'grid.png', 'images', 'labels.npy',
                                    'metrics.json', 'tokens.npy']
  assert sorted(os.listdir(d1)) == ['.disa_jax-output', 'images']   # each a finished output
  ids0 = sorted(int(f[:6]) for f in os.listdir(d0 / 'images'))
  ids1 = sorted(int(f[:6]) for f in os.listdir(d1 / 'images'))
  assert ids0 == [0, 1, 2, 3, 8, 9] and ids1 == [4, 5, 6, 7]   # rows split by process
  ref_tokens, _, _ = _reference(tmp_path)
  np.testing.assert_array_equal(np.load(d0 / 'tokens.npy'), ref_tokens)
  _check_images(d0 / 'images', ids0, ref_tokens)
  _check_images(d1 / 'images', ids1, ref_tokens)
  assert not list(work.glob('*/outputs/*.partial'))

  # The output now exists on process 1's disk only: both processes refuse, none writes.
  (d0.parent / 'run').rename(d0.parent / 'moved')
  proc = _spawn('outputs/run', logs, workdirs=work)
  _, err = proc.communicate(timeout=420)
  assert proc.returncode == 2, err + _logs(logs)
  for i in (0, 1):
    text = (logs / f'process-{i}.log').read_text()
    assert 'error: output' in text and 'already exists (on at least one process)' in text, text
    assert 'Traceback' not in text
  assert not (d0.parent / 'run').exists()
  assert sorted(os.listdir(d1)) == ['.disa_jax-output', 'images']   # left as it was
