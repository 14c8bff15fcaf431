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


def test_sample_sharded_over_8_devices(tmp_path):
  out = tmp_path / 'out8'
  r = run_cli(TINY, '--num-images=10', '--batch-size=8', '--num-iter=4', '--preset=mar',
              '--upper-steps=4', f'--out={out}', devices=8)
  assert r.returncode == 0, r.stderr
  m = json.loads((out / 'metrics.json').read_text())
  assert m['data_parallel'] == 8 and m['num_images'] == 10 and m['max_timestep'] is None
  assert np.load(out / 'tokens.npy').shape == (10, 16, 16)


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
  from flax import nnx

  from disa_jax.checkpoint import save_model
  from disa_jax.config import TINY_MODEL
  from disa_jax.systems.mar.model import MAR, MARConfig

  cfg = MARConfig.from_dict({**TINY_MODEL, 'encoder_depth': 3})
  ckpt = save_model(tmp_path / 'ckpt', MAR(cfg, rngs=nnx.Rngs(0)), kind='mar',
                    model_config=cfg.to_dict())
  r = run_cli(TINY, f'--checkpoint={ckpt}', f'--out={tmp_path / "o"}')
  assert r.returncode == 2
  assert 'config and checkpoint disagree on the architecture (encoder_depth: config 2 vs ' \
         'checkpoint 3)' in r.stderr
  assert not (tmp_path / 'o').exists()
  # The matching config loads it.
  r = run_cli(TINY, f'--checkpoint={ckpt}', '--config.model.encoder_depth=3', '--num-iter=2',
              '--num-images=2', '--batch-size=2', f'--out={tmp_path / "ok"}')
  assert r.returncode == 0, r.stderr
  assert f'checkpoint {ckpt}' in r.stdout


def test_existing_output_not_overwritten(tmp_path):
  out = tmp_path / 'exists'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  r = run_cli(TINY, f'--out={out}')
  assert r.returncode == 2 and 'already exists' in r.stderr
  assert (out / 'keep.txt').exists()


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
