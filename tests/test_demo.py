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


def _run_demo(tmp_path, systems):
  out = tmp_path / 'demo'
  r = subprocess.run(
    [sys.executable, '-m', 'disa_jax.cli.demo', '--num-images=10', '--batch-size=10',
     '--num-iter=4', '--mar-steps=8', '--disa-upper=8', '--disa-lower=2', f'--out={out}',
     f'--systems={systems}'],
    capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
  assert r.returncode == 0, r.stderr
  assert 'MAR ' in r.stdout and 'DiSA ' in r.stdout and 'speedup' in r.stdout
  return out, json.loads((out / 'metrics.json').read_text()), r.stdout


def _check_mar(m):
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


def _check_other_system(m, name):
  """The bundled FlowAR / xAR digits model's rows: official schedule and DiSA, same classes."""
  from disa_jax.systems.flowar.config import digits_config as flowar_digits
  from disa_jax.systems.xar.config import digits_config as xar_digits

  base, disa_run = m['runs'][f'{name} official'], m['runs'][f'{name} DiSA']
  if name == 'FlowAR':
    fl = flowar_digits().sampling
    assert base['steps_requested'] == [fl.upper_steps] * 5 and base['cfg'] == fl.baseline_cfg
    assert disa_run['steps_requested'][::4] == [fl.upper_steps, fl.lower_steps]
    assert disa_run['cfg'] == fl.cfg
  else:
    xa = xar_digits().sampling
    assert base['steps_requested'] == [xa.baseline_steps] * 4 and base['cfg'] == xa.cfg
    assert disa_run['steps_requested'][::3] == [xa.upper_steps, xa.lower_steps]
  assert base['speedup'] == 1.0 and base['max_timestep'] is None
  assert disa_run['head_token_steps_per_image'] < base['head_token_steps_per_image']
  for run in (base, disa_run):
    assert run['accuracy'] >= 0.2 and run['num_images'] == 10     # digits, not noise (0.1)


def test_demo_smoke_on_bundled_model(tmp_path):
  """MAR's three schedules and the bundled FlowAR (xAR: the slow test below)."""
  out, m, stdout = _run_demo(tmp_path, 'FlowAR')
  assert {k for k in m['runs'] if k.startswith(('FlowAR', 'xAR'))} == {'FlowAR official',
                                                                        'FlowAR DiSA'}
  _check_mar(m)
  _check_other_system(m, 'FlowAR')
  _check_figures_from_written_output(out, m, stdout)


@pytest.mark.slow
def test_demo_with_every_bundled_system(tmp_path):
  """The README demo's default panels: MAR, FlowAR and xAR (xAR compiles ~90 s on 2 cores)."""
  out, m, stdout = _run_demo(tmp_path, 'FlowAR,xAR')
  _check_mar(m)
  for name in ('FlowAR', 'xAR'):
    _check_other_system(m, name)
  _check_figures_from_written_output(out, m, stdout)


def _check_figures_from_written_output(out, m, stdout):
  """Every figure of metrics.json recomputed from the demo's own output: speedups and ms/image
  from the timings, head token-steps from the step lists, accuracy / FD / confidence by
  scoring the images cut back out of grid.png (lossless; one panel per run), and the printed
  table from metrics.json."""
  import numpy as np
  import pytest
  from PIL import Image

  from disa_jax.engine.runner import class_labels
  from disa_jax.systems.mar.plan import mask_schedule

  runs, n = m['runs'], m['num_images']
  labels = class_labels(n, [], 10)
  order = np.argsort(labels, kind='stable')
  grid = np.asarray(Image.open(out / 'grid.png').convert('RGB'))
  per_class = int(np.bincount(labels).max())
  ncol = min(per_class, 10)
  nrow = -(-n // ncol)
  from disa_jax.cli.demo import PANEL_GAP, TITLE_H, UPSCALE, bundled_config, system_of_run
  from disa_jax.eval.quality import get_quality_metric

  D = bundled_config(m['bundled']).model

  cell = UPSCALE * D['img_size']                        # one upscaled digit
  size = max(260, ncol * (cell + 2) + 2)                # panel width (padded for its title)
  height = nrow * (cell + 2) + 2                        # panel height
  quality = get_quality_metric(m['metric'])
  seq = mask_schedule(m['num_iter'], (D['img_size'] // D['vae_stride'] // D['patch_size']) ** 2)
  panels = stdout.split('(panels: ')[1].split(')')[0].split(', ')   # grid order
  assert sorted(panels) == sorted(runs)
  systems = list(dict.fromkeys(system_of_run(p) for p in panels))   # one row of panels each
  assert systems[0] == 'MAR' and grid.shape[0] == len(systems) * (height + TITLE_H)
  for name in panels:
    row = systems.index(system_of_run(name))
    col = [p for p in panels if system_of_run(p) == system_of_run(name)].index(name)
    run, x0 = runs[name], col * (size + PANEL_GAP)
    y0 = row * (height + TITLE_H) + TITLE_H + 2
    imgs = np.stack([grid[y0 + r * (cell + 2):y0 + r * (cell + 2) + cell:UPSCALE,
                          x0 + 2 + c * (cell + 2):x0 + 2 + c * (cell + 2) + cell:UPSCALE]
                     for r in range(nrow) for c in range(ncol)][:n])
    again = quality.evaluate(imgs, labels[order])
    assert again['accuracy'] == run['accuracy'], name
    assert again['fd'] == pytest.approx(run['fd'], rel=1e-4, abs=1e-6), name
    assert again['confidence'] == pytest.approx(run['confidence'], rel=1e-5), name
    system = system_of_run(name)
    base = 'MAR' if system == 'MAR' else f'{system} official'
    assert run['speedup'] == pytest.approx(runs[base]['sample_s'] / run['sample_s'], rel=1e-9)
    assert run['ms_per_image'] == pytest.approx(1000 * run['sample_s'] / n, rel=1e-9)
    if system == 'MAR':          # tokens predicted per AR step x diffusion steps
      tokens = [step[2] for step in seq]
    elif system == 'FlowAR':     # every token of scale m x m, flow-head evaluations
      tokens = [m * m for m in (1, 2, 4, 8, 16)]
    else:                        # xAR: a cell's 64 tokens per step (+ the previous clean cell)
      tokens = [64] * 4
    extra = 64 * 3 if system == 'xAR' else 0
    assert run['head_token_steps_per_image'] == extra + sum(
      t * a for t, a in zip(tokens, run['steps_actual'], strict=True)), name
    row = next(line for line in stdout.splitlines() if line.startswith(name + '  '))
    assert f'{run["speedup"]:.2f}x' in row and f'{run["accuracy"]:.3f}' in row, row
    assert f'{run["fd"]:.2f}' in row, row


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


def test_demo_unknown_system_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.demo', '--systems=FlowAR,harmon',
                      f'--out={tmp_path / "x"}'], capture_output=True, text=True, env=_env(),
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith("error: --systems: unknown system 'harmon'; choose from FlowAR, xAR")
  assert not (tmp_path / 'x').exists()
