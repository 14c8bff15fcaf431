"""xAR training (`systems/xar/train.py`): the noisy-context flow-matching loss against a direct
numpy computation (cell-major order, one noise level per cell, the label drop), the draws'
shapes and law, a few AdamW steps lowering the loss, and `disa-train` on the bundled digits:
an interrupted run resumed from its checkpoint reproduces the uninterrupted run's losses, and
the exported model samples with disa-sample."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flow_testlib import check_pixel_images, train_a_few_steps

from disa_jax.systems.xar.config import TINY, xar_config
from disa_jax.systems.xar.model import XAR, cell_order
from disa_jax.systems.xar.train import draw_randomness, init_state, train_step, xar_loss


def _model(seed=0):
  return XAR(TINY, rngs=nnx.Rngs(seed))


def _direct_loss(model, x, labels, t, noise, drop):
  """numpy: labels dropped to the null class, tokens reordered cell by cell, each cell noised
  with its own t, velocity target eps - x0, mean square error."""
  cfg = model.cfg
  b = x.shape[0]
  labels = np.where(drop < 0.1, cfg.null_class, labels)
  raster = x.reshape(b, 256, -1).astype(np.float64)
  order = cell_order(cfg)
  x0 = np.stack([raster[:, order[64 * k:64 * (k + 1)]] for k in range(4)], axis=1)  # (B,4,64,C)
  eps = noise.reshape(b, 4, 64, -1).astype(np.float64)
  tt = t.astype(np.float64)[:, :, None, None]
  xt = ((1 - tt) * x0 + tt * eps).astype(np.float32).reshape(b, 256, -1)
  tau = (t.astype(np.float32) * np.float32(1000)).astype(np.int32)
  v = np.asarray(model.forward_full(jnp.asarray(xt), jnp.asarray(labels, jnp.int32),
                                    jnp.asarray(tau)), np.float64).reshape(b, 4, 64, -1)
  return ((v - (eps - x0)) ** 2).mean()


def test_loss_matches_direct_computation():
  from xar_testlib import jax_model, torch_model

  model = jax_model(torch_model(seed=3))          # large random weights: every input matters
  b = 3
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 16, 16, 16)).astype(np.float32)
  labels = np.array([1, 2, 3])
  r = draw_randomness(jax.random.key(4), b, model.cfg)
  t, noise = np.asarray(r['t']), np.asarray(r['noise'])
  drop = np.array([0.05, 0.5, 0.9], np.float32)                # image 0 loses its label
  with jax.default_matmul_precision('highest'):
    loss, per = jax.jit(lambda m, x, y, t, n, d: xar_loss(m, x, y, t=t, noise=n, drop=d))(
      model, jnp.asarray(x), jnp.asarray(labels), r['t'], r['noise'], jnp.asarray(drop))
    want = _direct_loss(model, x, labels, t, noise, drop)
    kept = _direct_loss(model, x, labels, t, noise, np.ones(b, np.float32))
    raster = _direct_loss(model, x.reshape(b, 256, 16)[:, np.argsort(cell_order(model.cfg))]
                          .reshape(b, 16, 16, 16), labels, t, noise, drop)
  assert per.shape == (4,)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(float(per.mean()), want, rtol=2e-5)
  assert abs(kept - want) > 1e-3 * want                        # the label drop matters
  assert abs(raster - want) > 1e-3 * want                      # so does the cell-major order


def test_randomness_one_noise_level_per_cell():
  r = draw_randomness(jax.random.key(0), 4096, TINY)
  t = np.asarray(r['t'])
  assert t.shape == (4096, 4) and r['noise'].shape == (4096, 256, 16)
  assert 0 < t.min() and t.max() < 1
  # sigmoid(N(0, 1)): median 0.5, P(t < sigmoid(-1)) = P(n < -1) = 0.159
  assert abs(np.median(t) - 0.5) < 0.02
  assert abs(np.mean(t < 1 / (1 + np.e)) - 0.1587) < 0.01
  assert abs(np.corrcoef(t[:, 0], t[:, 3])[0, 1]) < 0.05     # cells drawn independently


def test_a_few_steps_lower_the_loss():
  state, metrics = train_a_few_steps(_model(), init_state=init_state, train_step=train_step,
                                     b2=0.96)
  losses = [float(m['loss']) for m in metrics]
  assert all('loss_cell3' in m for m in metrics)
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  assert int(state.step) == 12


def _losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {d['step']: d['loss'] for d in map(json.loads, lines)}


@pytest.mark.slow
def test_disa_train_digits_resume_and_sample(tmp_path):
  """6 steps in one go vs 3 steps, stop, resume to 6: the same losses; the export samples."""
  import os
  import subprocess
  import sys

  from conftest import CACHE, REPO

  from disa_jax.data import digits
  from disa_jax.train.loop import train

  cache = digits.build_cache(tmp_path / 'digits')

  def config():
    c = xar_config('B', 'tiny,digits')
    c.data.cache_dir = str(cache)
    c.runtime.compilation_cache = CACHE
    c.train.update(num_steps=6, log_every=1, checkpoint_every=3)
    return c

  train(config(), tmp_path / 'ref', print_fn=lambda *a: None)
  want = _losses(tmp_path / 'ref')
  assert sorted(want) == list(range(1, 7)) and all(np.isfinite(v) for v in want.values())
  train(config(), tmp_path / 'run', stop_at=3, print_fn=lambda *a: None)
  assert sorted(_losses(tmp_path / 'run')) == [1, 2, 3]
  printed = []
  train(config(), tmp_path / 'run', export=str(tmp_path / 'model'), print_fn=printed.append)
  assert any('resumed from' in p and 'at step 3' in p for p in printed), printed
  got = _losses(tmp_path / 'run')
  assert sorted(got) == list(range(1, 7))
  for s in range(1, 7):
    assert got[s] == pytest.approx(want[s], rel=1e-6), s
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=str(REPO))
  out = tmp_path / 'samples'
  r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.sample',
                      f'--config={REPO}/configs/xar/b.py:tiny,digits',
                      f'--checkpoint={tmp_path / "model"}', '--num-images=2', '--batch-size=2',
                      '--noprogress', f'--out={out}', f'--config.runtime.compilation_cache={CACHE}',
                      '--save-tokens'],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr
  check_pixel_images(out, 2)
