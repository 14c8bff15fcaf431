"""disa-train: steps, sharding equivalence, NaN guard, resume after SIGKILL, export -> sample."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CACHE, REPO
from flax import nnx
from helpers import randomize

from disa_jax import sharding as shd
from disa_jax.config import digits_config
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.train import loop, optim
from disa_jax.train.partition import state_shardings
from disa_jax.train.step import mar_loss, train_step

DIGITS = f'{REPO}/configs/digits.py:tiny'


@pytest.fixture(scope='module')
def digits_cache(tmp_path_factory):
  from disa_jax.data import digits

  return digits.build_cache(tmp_path_factory.mktemp('cache') / 'digits')


def _config(cache, **train):
  """The tiny digits config; tests only change host-side options (num_steps, logging,
  checkpoints), so every test shares one compiled train step."""
  c = digits_config(tiny=True)
  c.data.cache_dir = str(cache)
  c.runtime.compilation_cache = CACHE
  c.train.update(train)
  return c


def _batch(n=16, seed=0):
  from disa_jax.data.digits import load_split

  x, y = load_split('train')
  idx = np.random.default_rng(seed).choice(len(y), n, replace=False)
  return {'mean': x[idx], 'logvar': np.full_like(x[idx], -30.0), 'label': y[idx]}


def _setup(config, mesh):
  """(initial state, jitted step) exactly as `loop.train` builds them."""
  cfg = MARConfig.from_dict(dict(config.model))
  tc = config.train
  tx = optim.make_optimizer(tc, tc.batch_size)
  init = partial(loop._init_state, cfg, tx, tc.seed)
  sh = state_shardings(jax.eval_shape(init), mesh)
  state = jax.jit(init, out_shardings=sh)()
  fn = jax.jit(partial(train_step, graphdef=loop.graphdef_of(cfg), tx=tx, ema_rate=tc.ema_rate,
                       latent_scale=config.data.latent_scale, patch_size=cfg.patch_size),
               in_shardings=(sh, shd.batch_sharded(mesh)),
               out_shardings=(sh, shd.replicated(mesh)), donate_argnums=(0,))
  return state, fn


def test_train_steps_decrease_the_loss(digits_cache):
  config = _config(digits_cache)
  state, fn = _setup(config, shd.make_mesh(1))
  batch = _batch()
  rng = np.asarray(state.rng)  # the state is donated to each step
  ema0 = jax.tree.map(np.asarray, state.ema)
  losses = []
  for _ in range(13):  # same batch and same random stream every step: a fixed objective
    state, m = fn(state.replace(rng=rng), batch)
    assert m['finite'] == 1.0
    losses.append(float(m['loss']))  # loss of the parameters *before* this update
  assert int(state.step) == 13
  assert losses[-1] < 0.8 * losses[0], losses
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                       state.ema, ema0))
  assert max(moved) > 0


@pytest.mark.parametrize('devices,fsdp', [
  (8, 1), pytest.param(8, 2, marks=pytest.mark.slow)])
def test_one_vs_many_devices_same_loss_and_update(digits_cache, devices, fsdp):
  config = _config(digits_cache)  # dropout 0.1: its randomness must not depend on the layout
  batch = _batch(seed=1)
  out = {}
  for n, f in ((1, 1), (devices, fsdp)):
    mesh = shd.make_mesh(n, fsdp=f)
    state, fn = _setup(config, mesh)
    b = {k: shd.global_batch_array(v, mesh) for k, v in batch.items()}
    state, m1 = fn(state, b)
    state, m2 = fn(state, b)
    out[n] = (jax.device_get(m1), jax.device_get(m2), jax.device_get(state.params))
  (a1, a2, pa), (b1, b2, pb) = out[1], out[devices]
  for k in ('loss', 'mse', 'vb', 'grad_norm', 'mask_ratio'):
    np.testing.assert_allclose(a1[k], b1[k], rtol=2e-5, err_msg=k)
    np.testing.assert_allclose(a2[k], b2[k], rtol=2e-5, err_msg=k)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


def test_fsdp_shards_large_parameters():
  from disa_jax.train.partition import leaf_spec

  assert leaf_spec((96, 288), 2) == jax.P(None, 'fsdp')
  assert leaf_spec((96,), 2) == jax.P()            # small: replicated
  assert leaf_spec((333, 129), 2) == jax.P()       # no divisible dimension


def test_nan_guard_stops_with_clear_message(tmp_path):
  from disa_jax.data.cache import cache_moments
  from disa_jax.data.digits import ArraySource, load_split

  x, y = load_split('heldout')
  bad = cache_moments(tmp_path / 'nan', {'train': ArraySource(x[:40], y[:40])},
                      lambda im: (np.full_like(im, np.nan), np.zeros_like(im)),
                      preprocess=lambda ex: (ex['image'], ex['label']),
                      meta={'dataset': 'nan', 'latent_scale': 1.4})
  config = _config(bad, num_steps=4, batch_size=16)
  with config.unlocked():
    config.data.kind = 'cache'
  with pytest.raises(loop.TrainingDiverged, match=r'loss is nan .* at step 1; the update was '
                     'skipped'):
    loop.train(config, tmp_path / 'run', print_fn=lambda s: None)
  # The guarded step leaves the state unchanged.
  mesh = shd.make_mesh(1)
  state, fn = _setup(config, mesh)
  p0 = jax.tree.map(np.asarray, state.params)
  batch = _batch()
  batch['mean'] = np.full_like(batch['mean'], np.inf)
  state, m = fn(state, batch)
  assert m['finite'] == 0.0 and int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(p0), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _train_cmd(workdir, cache, *extra):
  return [sys.executable, '-m', 'disa_jax.cli.train', f'--config={DIGITS}',
          f'--workdir={workdir}', f'--config.data.cache_dir={cache}',
          f'--config.runtime.compilation_cache={CACHE}', '--config.train.num_steps=16',
          '--config.train.log_every=1', '--config.train.checkpoint_every=4', *extra]


def _losses(workdir):
  rows = [json.loads(ln) for ln in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in rows}


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses(tmp_path, digits_cache):
  ref = tmp_path / 'ref'
  r = subprocess.run(_train_cmd(ref, digits_cache), capture_output=True, text=True,
                     env=_env(), cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr
  want = _losses(ref)
  assert sorted(want) == list(range(1, 17))

  run = tmp_path / 'run'
  p = subprocess.Popen(_train_cmd(run, digits_cache), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
  ckpt = run / 'checkpoints' / '8'
  deadline = time.time() + 600
  while not ckpt.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  done = _losses(run)
  assert max(done) < 16
  r = subprocess.run(_train_cmd(run, digits_cache), capture_output=True, text=True,
                     env=_env(), cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr
  resumed_at = int(r.stdout.split('resumed from ')[1].split(' at step ')[1].split()[0])
  assert 8 <= resumed_at < 16
  got = _losses(run)
  assert sorted(got) == list(range(1, 17))
  for s in range(1, 17):
    assert got[s] == pytest.approx(want[s], rel=1e-6), s
  # TensorBoard event files hold the same scalars.
  events = list((run / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and _tb_scalars(events, 'train/loss')[16] == pytest.approx(want[16], rel=1e-6)
  assert json.loads((run / 'config.json').read_text())['model']['encoder_embed_dim'] == 32


def _tb_scalars(paths, tag):
  from tensorboardX.proto import event_pb2

  out = {}
  for path in paths:
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in ev.summary.value:
        if v.tag == tag:
          out[ev.step] = v.simple_value
  return out


def test_export_load_and_sample(tmp_path, digits_cache):
  from disa_jax.checkpoint import load_mar, read_meta
  from disa_jax.systems.mar.sampling import Sampler

  config = _config(digits_cache, num_steps=3, log_every=1, checkpoint_every=3)
  out = tmp_path / 'model'
  res = loop.train(config, tmp_path / 'run', export=str(out), print_fn=lambda s: None)
  assert res.step == 3 and res.exported == out
  meta, stored = read_meta(out)
  assert meta['kind'] == 'mar' and meta['weights'] == 'ema' and meta['step'] == 3
  model = load_mar(out)
  state, _ = loop.restore_state(tmp_path / 'run', config)
  ema = jax.tree.leaves(state.ema)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), ema, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = Sampler(model).generate(np.array([1, 2]), jax.random.key(0), steps=[3, 2], cfg=2.0)
  assert tokens.shape == (2, 64, 4) and np.isfinite(np.asarray(tokens)).all()
  # The CLI samples from the exported directory (pixel tokenizer -> PNG images).
  r = subprocess.run(
    [sys.executable, '-m', 'disa_jax.cli.sample', f'--config={DIGITS}', f'--checkpoint={out}',
     '--num-images=2', '--batch-size=2', '--num-iter=2', '--upper-steps=3', '--lower-steps=2',
     f'--out={tmp_path / "samples"}', f'--config.runtime.compilation_cache={CACHE}',
     '--noprogress'], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(tmp_path / 'samples' / 'images')) == ['000000.png', '000001.png']


def test_train_cli_errors(tmp_path, digits_cache):
  r = subprocess.run(_train_cmd(tmp_path / 'w', digits_cache, '--config.model.img_size=32'),
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert 'holds moments of shape [16, 16, 1] but the model expects [32, 32, 1]' in r.stderr
  r = subprocess.run(_train_cmd(tmp_path / 'w2', tmp_path / 'nothing',
                                '--config.data.kind=cache'),
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
  assert r.returncode == 2 and 'is not a complete moments cache' in r.stderr


def test_dropout_changes_the_training_loss_only_with_a_key():
  cfg = MARConfig.from_dict({**dict(digits_config(tiny=True).model), 'attn_dropout': 0.5,
                             'proj_dropout': 0.5, 'label_drop_prob': 0.0})
  model = randomize(MAR(cfg, rngs=nnx.Rngs(0)))  # non-zero head output layers
  tokens = jax.random.normal(jax.random.key(1), (2, 64, 4))
  labels = jnp.array([1, 2])
  a = mar_loss(model, tokens, labels, jax.random.key(3), train=False)[0]
  b = mar_loss(model, tokens, labels, jax.random.key(3), train=False)[0]
  c = mar_loss(model, tokens, labels, jax.random.key(3), train=True)[0]
  assert float(a) == float(b) and float(a) != float(c)


def test_bfloat16_compute_keeps_float32_master_weights(digits_cache):
  config = _config(digits_cache)
  with config.unlocked():
    config.model.dtype = 'bfloat16'
  state, fn = _setup(config, shd.make_mesh(1))
  state, m = fn(state, _batch())
  assert m['finite'] == 1.0 and 0.1 < float(m['loss']) < 10
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)} | \
    {x.dtype for x in jax.tree.leaves(state.ema)}
  assert dtypes == {jnp.dtype('float32')}


def test_train_on_imagenet_style_kl_cache(tmp_path):
  """The ImageNet path end to end with a stand-in encoder: centre crop -> moments of image
  and flip -> ArrayRecord -> grain (random flips) -> train (mar_base:tiny, 4x4x16 latents)."""
  from disa_jax.config import mar_config
  from disa_jax.data import imagenet
  from disa_jax.data.cache import cache_moments

  def encode(images):  # [B, 256, 256, 3] -> [B, 4, 4, 16]
    pooled = images.reshape(len(images), 4, 64, 4, 64, 3).mean(axis=(2, 4))
    mean = np.concatenate([pooled * (1 + 0.1 * i) for i in range(6)], axis=-1)[..., :16]
    return mean, np.full_like(mean, -2.0)

  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, (260 + 7 * i, 300, 3), dtype=np.uint8),
               'label': i % 10} for i in range(12)]
  cache = cache_moments(tmp_path / 'kl', {'train': examples}, encode,
                        preprocess=imagenet.preprocess, batch_size=4,
                        meta={'dataset': 'fake', 'latent_scale': imagenet.KL16_SCALE})
  config = mar_config('mar_base', tiny=True)
  config.model.update(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_d=1,
                      diffloss_w=32)  # keeps the compile short
  config.data.cache_dir = str(cache)
  config.runtime.compilation_cache = CACHE
  config.train.update(batch_size=4, num_steps=2, log_every=1, checkpoint_every=2, num_devices=1)
  res = loop.train(config, tmp_path / 'run', export=str(tmp_path / 'm'), print_fn=lambda s: None)
  assert res.step == 2 and np.isfinite(res.last_metrics['loss'])
  from disa_jax.checkpoint import load_mar

  assert load_mar(tmp_path / 'm').config.seq_len == 16
