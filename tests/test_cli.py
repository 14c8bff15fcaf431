"""disa-sample / disa-bench end to end (subprocesses, as a user runs them)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CACHE, REPO

TINY = f'--config={REPO}/configs/mar_base.py:tiny'


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['DISA_TEST_XLA_CACHE'] = CACHE
  return env


def run_cli(*args, devices=1, tool='sample'):
  cmd = [sys.executable, '-m', f'disa_jax.cli.{tool}', *args,
         f'--config.runtime.compilation_cache={CACHE}', '--noprogress' if tool == 'sample' else '']
  return subprocess.run([c for c in cmd if c], capture_output=True, text=True, env=_env(devices),
                        cwd=REPO, timeout=900)


def test_sample_happy_path(tmp_path):
  out = tmp_path / 'out'
  r = run_cli(TINY, '--num-images=5', '--batch-size=2', '--num-iter=4', '--classes=3,7',
              f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert 'RANDOM WEIGHTS' in r.stdout
  files = sorted(os.listdir(out))
  assert files == ['.disa_jax-output', 'grid.png', 'labels.npy', 'metrics.json', 'tokens.npy']
  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (5, 16, 16) and np.isfinite(tokens).all()
  assert list(np.load(out / 'labels.npy')) == [3, 7, 3, 7, 3]
  m = json.loads((out / 'metrics.json').read_text())
  assert m['num_images'] == 5 and m['num_iter'] == 4 and m['max_timestep'] == 950
  assert m['steps_requested'][0] == 10 and m['steps_requested'][-1] == 3
  assert m['compilations']['total'] == 1 + m['compilations']['backbone'] + \
    m['compilations']['head']
  assert m['images_per_s'] > 0 and m['compile_s'] >= 0 and m['head_padding_waste'] <= 0.05
  assert not any(p.name.endswith('.partial') for p in tmp_path.iterdir())


def _random_checkpoint(path, **overrides):
  """A tiny MAR with non-zero random weights everywhere (the official init zeroes the head's
  output layers, which would make tokens independent of the network), saved as a model dir."""
  from flax import nnx
  from helpers import randomize

  from disa_jax.checkpoint import save_model
  from disa_jax.config import TINY_MODEL
  from disa_jax.systems.mar.model import MAR, MARConfig

  cfg = MARConfig.from_dict({**TINY_MODEL, **overrides})
  return save_model(path, randomize(MAR(cfg, rngs=nnx.Rngs(0)), seed=3), kind='mar',
                    model_config=cfg.to_dict())


def _api_tokens(ckpt, m, labels, seed, batch_size):
  """The Python API (`Sampler.generate`, one device) on the CLI run's settings (metrics.json,
  and the CLI's default `runtime.head_steps='traced'`), batch by batch with the global image
  ids; the last batch padded with the last label."""
  import jax

  from disa_jax.checkpoint import load_mar
  from disa_jax.systems.mar.sampling import Sampler

  sampler, out, n = Sampler(load_mar(ckpt), head_steps='traced'), [], len(labels)
  for lo in range(0, n, batch_size):
    ids = np.arange(lo, lo + batch_size)
    out.append(np.asarray(sampler.generate(
      labels[np.minimum(ids, n - 1)], jax.random.key(seed), steps=m['steps_requested'],
      max_timestep=m['max_timestep'], cfg=m['cfg'], cfg_schedule=m['cfg_schedule'],
      temperature=m['temperature'], image_ids=ids)))
  return np.concatenate(out)[:n]


@pytest.mark.slow
def test_sample_sharded_over_8_devices(tmp_path):
  """8 fake devices: the tokens equal the Python API's on one device within float32 rounding
  (1e-5 of the tokens' scale; the sharded matmuls block differently)."""
  out = tmp_path / 'out8'
  ckpt = _random_checkpoint(tmp_path / 'ckpt')
  r = run_cli(TINY, '--num-images=10', '--batch-size=8', '--num-iter=4', '--preset=mar',
              '--upper-steps=4', f'--checkpoint={ckpt}', '--config.sampling.seed=6',
              f'--out={out}', devices=8)
  assert r.returncode == 0, r.stderr
  m = json.loads((out / 'metrics.json').read_text())
  assert m['data_parallel'] == 8 and m['num_images'] == 10 and m['max_timestep'] is None
  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (10, 16, 16)
  want = _api_tokens(ckpt, m, np.load(out / 'labels.npy'), 6, 8)
  assert np.abs(tokens - want).max() <= 1e-5 * np.abs(want).max()
  assert np.abs(want).max() > 0.5 and np.abs(tokens[0] - tokens[1]).max() > 1e-2


@pytest.mark.parametrize('args,message', [
  (['--upper-steps=3', '--lower-steps=10'], 'upper steps (3) must be >= lower steps (10)'),
  (['--lower-steps=0'], 'flag --lower_steps=0: --lower_steps must be an integer in [1, 1000]'),
  (['--lower-steps=1001'], '--lower_steps must be an integer in [1, 1000]'),
  (['--strategy=fast'], 'flag --strategy=fast: value should be one of <constant|linear'),
  (['--config.sampling.strategy=fast'], "unknown step strategy 'fast'"),
  (['--num-iter=17'], '--num_iter must be in [1, 16]'),
  (['--steps=5,4'], 'explicit step list has 2 entries but num_iter is 8'),
  (['--checkpoint=/no/such/dir'], 'checkpoint /no/such/dir does not exist'),
  (['--classes=3,99'], 'class 99 is out of range'),
])
def test_sample_bad_input_one_line_error(tmp_path, args, message):
  out = tmp_path / 'bad'
  r = run_cli(TINY, *args, f'--out={out}')
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith('error:')]
  assert lines and message in lines[0], r.stderr
  assert 'Traceback' not in r.stderr
  assert not out.exists() and not (tmp_path / 'bad.partial').exists()


def test_config_checkpoint_mismatch(tmp_path):


  ckpt = _random_checkpoint(tmp_path / 'ckpt', encoder_depth=3)
  r = run_cli(TINY, f'--checkpoint={ckpt}', f'--out={tmp_path / "o"}')
  assert r.returncode == 2
  assert 'config and checkpoint disagree on the architecture (encoder_depth: config 2 vs ' \
         'checkpoint 3)' in r.stderr
  assert not (tmp_path / 'o').exists()
  # The matching config loads it, and its tokens are exactly the Python API's for the seed.
  ok = tmp_path / 'ok'
  r = run_cli(TINY, f'--checkpoint={ckpt}', '--config.model.encoder_depth=3', '--num-iter=2',
              '--num-images=3', '--batch-size=2', '--classes=0,4', '--config.sampling.seed=5',
              f'--out={ok}')
  assert r.returncode == 0, r.stderr
  assert f'checkpoint {ckpt}' in r.stdout
  m = json.loads((ok / 'metrics.json').read_text())
  labels = np.load(ok / 'labels.npy')
  assert list(labels) == [0, 4, 0]
  np.testing.assert_array_equal(np.load(ok / 'tokens.npy'), _api_tokens(ckpt, m, labels, 5, 2))


def test_existing_output_not_overwritten(tmp_path):
  out = tmp_path / 'exists'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  r = run_cli(TINY, f'--out={out}')
  assert r.returncode == 2 and 'already exists' in r.stderr
  assert (out / 'keep.txt').exists()


@pytest.mark.slow
def test_bench_json(tmp_path):
  out = tmp_path / 'bench.json'
  r = run_cli(TINY, '--batch-size=2', '--runs=mar8=mar:8:12,disa8=disa:8:12:3:linear',
              '--json', f'--json-out={out}', tool='bench')
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout)
  assert res == json.loads(out.read_text())
  mar, disa = res['runs']
  assert mar['speedup'] == 1.0 and mar['head_token_steps_per_image'] == 16 * 12
  assert disa['head_token_steps_per_image'] < mar['head_token_steps_per_image']
  assert disa['flop_speedup'] > 1.0
  for run in res['runs']:
    assert run['wall_s'] > 0 and run['compile_s'] >= 0
    assert run['compilations']['head'] >= 1 and run['compilations']['backbone'] >= 1


def test_bench_bad_run_spec():
  r = run_cli(TINY, '--runs=fast:64', tool='bench')
  assert r.returncode == 2 and 'bad run spec' in r.stderr
