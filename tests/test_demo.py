"""The README demo (disa-demo) and disa-sample's default on the bundled digits model."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['HOME'] = env.get('HOME', '/tmp')
  return env


def test_demo_smoke_on_bundled_model(tmp_path):
  out = tmp_path / 'demo'
  r = subprocess.run(
    [sys.executable, '-m', 'disa_jax.cli.demo', '--num-images=10', '--batch-size=10',
     '--num-iter=4', '--mar-steps=8', '--disa-upper=8', '--disa-lower=2', f'--out={out}'],
    capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
  assert r.returncode == 0, r.stderr
  assert 'MAR ' in r.stdout and 'DiSA ' in r.stdout and 'speedup' in r.stdout
  m = json.loads((out / 'metrics.json').read_text())
  mar, clamp, disa = m['runs']['MAR'], m['runs']['MAR+clamp'], m['runs']['DiSA']
  assert mar['steps_requested'] == [8] * 4 and mar['max_timestep'] is None
  assert clamp['steps_requested'] == [8] * 4 and clamp['max_timestep'] == 950
  assert disa['steps_requested'][0] == 8 and disa['steps_requested'][-1] == 2
  assert disa['max_timestep'] == 950
  assert disa['head_token_steps_per_image'] < mar['head_token_steps_per_image']
  assert mar['speedup'] == 1.0 and disa['speedup'] > 0
  for run in (mar, clamp, disa):
    assert 0 <= run['accuracy'] <= 1 and run['fd'] >= 0 and run['sample_s'] > 0
    assert run['compile_s'] >= 0 and run['num_images'] == 10
  assert (out / 'grid.png').exists()


def test_sample_without_config_uses_bundled_model(tmp_path):
  out = tmp_path / 's'
  r = subprocess.run(
    [sys.executable, '-m', 'disa_jax.cli.sample', '--num-images=3', '--batch-size=3',
     '--num-iter=2', '--upper-steps=3', '--lower-steps=2', '--classes=4,7', f'--out={out}',
     '--noprogress'],
    capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr
  assert 'assets/digits_mar' in r.stdout and 'RANDOM' not in r.stdout
  assert sorted(os.listdir(out / 'images')) == ['000000.png', '000001.png', '000002.png']


def test_demo_bad_input(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.demo', '--num-images=1',
                      f'--out={tmp_path / "x"}'], capture_output=True, text=True, env=_env(),
                     timeout=300)
  assert r.returncode == 2 and r.stderr.startswith('error: --num-images must be >= 2')
  assert not (tmp_path / 'x').exists()


def test_demo_missing_bundled_model_is_one_line(tmp_path):
  from disa_jax.cli import demo

  if os.path.isdir(demo.bundled_config('mnist').checkpoint):
    pytest.skip('the MNIST model is shipped: nothing to refuse')
  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.demo', '--bundled=mnist',
                      f'--out={tmp_path / "x"}'], capture_output=True, text=True, env=_env(),
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith('error: the bundled mnist model is not in this package')
  assert 'disa-train --config=configs/mar/mnist.py' in r.stderr
  assert not (tmp_path / 'x').exists()
