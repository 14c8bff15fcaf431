"""FlowAR training loss and step: the official formula (FlowAR.forward + SILoss) recomputed
directly (torch F.interpolate for the per-scale targets and the teacher-forced inputs, numpy for
the flow-matching loss and weights), and a few AdamW steps lowering the loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flow_testlib import check_pixel_images, train_a_few_steps

from disa_jax.systems.flowar.train import draw_randomness, flowar_loss, init_state, train_step


def _model():
  from flowar_testlib import jax_model, torch_model

  return jax_model(torch_model('S', seed=11))


def _direct_loss(model, x_nhwc, labels, t, noise, drop):
  cfg = model.cfg
  labels = np.where(drop < 0.1, cfg.class_num, labels)
  x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
  gt = [F.interpolate(x, (m, m), mode='area') if m < 16 else x for m in cfg.scales]
  nxt = [F.interpolate(F.interpolate(gt[i], (16, 16), mode='bicubic'), (m, m), mode='area')
         for i, m in enumerate(cfg.scales[1:])]
  rows = lambda a: jnp.asarray(a.permute(0, 2, 3, 1).reshape(a.shape[0], -1, 16).numpy())  # noqa
  cond = model.class_embedding(jnp.asarray(labels))
  tokens = jnp.concatenate([cond[:, None], model.embed_tokens(
    jnp.concatenate([rows(u) for u in nxt], 1))], 1)
  z = np.asarray(model.trunk_full(tokens, cond))
  total, start = 0.0, 0
  for s, m in enumerate(cfg.scales):
    x0 = np.asarray(rows(gt[s]), np.float64)
    eps = np.asarray(noise[s], np.float64)
    ts = np.asarray(t[s], np.float64)[:, None, None]
    xt = ((1 - ts) * x0 + ts * eps).astype(np.float32)
    tau = (np.asarray(t[s], np.float32) * np.float32(1000)).astype(np.int64)
    v = np.asarray(model.velocity(jnp.asarray(xt), jnp.asarray(tau), jnp.asarray(
      z[:, start:start + m * m]), s), np.float64)
    per_image = ((v - (eps - x0)) ** 2).mean(axis=(1, 2))
    total += per_image.mean() / 256 * m * m
    start += m * m
  return total


def test_loss_matches_direct_computation():
  model = _model()
  rng = np.random.default_rng(0)
  b = 4
  x = rng.standard_normal((b, 16, 16, 16)).astype(np.float32)
  labels = np.array([1, 2, 3, 4])
  r = draw_randomness(jax.random.key(3), b, model.cfg)
  drop = np.array([0.05, 0.5, 0.9, 0.2], np.float32)          # image 0 loses its label
  with jax.default_matmul_precision('highest'):
    loss, per = jax.jit(lambda m, x, y, t, n, d: flowar_loss(m, x, y, t=t, noise=n, drop=d))(
      model, jnp.asarray(x), jnp.asarray(labels), r['t'], r['noise'], jnp.asarray(drop))
    want = _direct_loss(model, x, labels, np.asarray(r['t']), [np.asarray(n) for n in r['noise']],
                        drop)
  assert per.shape == (5,)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  # The weights n_s / 256 matter: the unweighted sum is far off.
  assert abs(float(per.sum()) - want) < 1e-5 * want
  with jax.default_matmul_precision('highest'):
    kept = _direct_loss(model, x, labels, np.asarray(r['t']), [np.asarray(n) for n in r['noise']],
                        np.ones(b, np.float32))
  assert abs(kept - want) > 1e-3 * want                         # the label drop changes it


def test_a_few_steps_lower_the_loss():
  state, metrics = train_a_few_steps(_model(), init_state=init_state, train_step=train_step,
                                     b2=0.95)
  losses = [float(m['loss']) for m in metrics]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  assert int(state.step) == 12
  moved = jax.tree.leaves(jax.tree.map(lambda e, p: jnp.abs(e - p).max(), state.ema,
                                       state.params))
  assert max(float(v) for v in moved) > 0                      # EMA lags the raw weights


def _cli(tool, *args):
  import os
  import subprocess
  import sys

  from conftest import CACHE, REPO
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', f'disa_jax.cli.{tool}', *args,
                         f'--config.runtime.compilation_cache={CACHE}'],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)


@pytest.mark.slow
def test_disa_train_digits_then_sample(tmp_path):
  from conftest import REPO

  cfg = f'--config={REPO}/configs/flowar/s.py:tiny,digits'
  cache = f'--config.data.cache_dir={tmp_path / "digits"}'
  r = _cli('train', cfg, cache, f'--workdir={tmp_path / "run"}', '--config.train.num_steps=6',
           '--config.train.log_every=3', '--config.train.checkpoint_every=3',
           f'--export={tmp_path / "model"}')
  assert r.returncode == 0, r.stderr
  assert 'exported the ema weights of step 6' in r.stdout
  lines = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in lines] == [3, 6] and all(np.isfinite(x['loss']) for x in lines)
  assert 'loss_scale4' in lines[0]
  out = tmp_path / 'samples'
  r = _cli('sample', cfg, f'--checkpoint={tmp_path / "model"}', '--num-images=2',
           '--batch-size=2', '--noprogress', f'--out={out}', '--save-tokens')
  assert r.returncode == 0, r.stderr
  check_pixel_images(out, 2)


def test_train_bad_label_drop(tmp_path):
  from conftest import REPO

  r = _cli('train', f'--config={REPO}/configs/flowar/s.py:tiny,digits',
           '--config.train.label_drop_prob=1.5', f'--workdir={tmp_path / "run"}')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and 'label_drop_prob' in lines[0], r.stderr
  assert not (tmp_path / 'run').exists()
