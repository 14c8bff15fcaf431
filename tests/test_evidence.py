"""The paper's measurements: head trajectories, variance / straightness probes, MLP
predictability, speed-quality curves, and the disa-evidence CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import CACHE, REPO
from helpers import tiny_model

from disa_jax.diffusion.ddpm import device_tables, p_sample_loop, p_sample_trajectory
from disa_jax.eval import evidence
from disa_jax.eval.curves import RunSpec, RunSpecError, default_runs, speed_quality
from disa_jax.schedules import resolve_steps
from disa_jax.systems.mar.sampling import Sampler

SAMPLING = ml_collections.ConfigDict(dict(cfg=2.0, cfg_schedule='linear', temperature=1.0))


@pytest.fixture(scope='module')
def sampler():
  return Sampler(tiny_model(0))


def test_trajectory_is_the_sampling_path(sampler):
  net = tiny_model(0).diffloss.net
  rng = np.random.default_rng(0)
  z, zu = (jnp.asarray(rng.standard_normal((5, 64)), jnp.float32) for _ in range(2))
  x = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((7, 5, 16)), jnp.float32)
  tables = device_tables(7, 950)
  kw = dict(num_steps=7, cfg=jnp.float32(1.5), temperature=jnp.float32(0.9),
            noise_at=lambda i: eps[i])
  traj = p_sample_trajectory(net, z, zu, x, tables, **kw)
  x0 = p_sample_loop(net, z, zu, x, tables, **kw)
  assert traj.shape == (8, 5, 16)
  np.testing.assert_array_equal(traj[0], x)
  np.testing.assert_allclose(traj[-1], x0, rtol=1e-6, atol=1e-6)
  # each state is one step of the loop from the previous one
  one = p_sample_loop(net, z, zu, x, tables, num_steps=1, cfg=jnp.float32(1.5),
                      temperature=jnp.float32(0.9), noise_at=lambda i: eps[i])
  np.testing.assert_allclose(traj[1], one, rtol=1e-6, atol=1e-6)


def test_path_straightness_known_paths():
  straight = jnp.linspace(0, 1, 6)[:, None, None] * jnp.array([[[3.0, 4.0]]])
  assert float(evidence.path_straightness(straight)[0]) == pytest.approx(1.0, abs=1e-6)
  # out along x, then up along y: steps at 45 degrees to the chord
  corner = jnp.array([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
  assert float(evidence.path_straightness(corner)[0]) == pytest.approx(np.sqrt(0.5), rel=1e-6)
  # a detour that doubles back has a negative step
  back = jnp.array([[[0.0, 0.0]], [[2.0, 0.0]], [[1.0, 0.0]]])
  assert float(evidence.path_straightness(back)[0]) == pytest.approx(0.0, abs=1e-6)


def test_probes_cover_every_ar_step_and_real_token(sampler):
  plan = resolve_steps(num_iter=4, preset='mar', upper=6, strategy='constant')
  labels = np.array([1, 2, 3, 4, 5, 6])                  # second batch: 2 real + 2 padding
  res = evidence.probe_steps(sampler, labels, jax.random.key(0), plan=plan, sampling=SAMPLING,
                             batch_size=4, measures=('variance', 'straightness'), samples=6,
                             probe_steps=6)
  from disa_jax.systems.mar.plan import mask_schedule

  n_pred = [n for _, _, n in mask_schedule(4, 16)]
  for m in ('variance', 'straightness'):
    rows = res[m]
    assert [r['ar_step'] for r in rows] == [0, 1, 2, 3]
    assert [r['tokens'] for r in rows] == [6 * n for n in n_pred]
  assert all(r['variance'] > 0 for r in res['variance'])
  assert all(-1 <= r['straightness'] <= 1 for r in res['straightness'])
  again = evidence.probe_steps(sampler, labels, jax.random.key(0), plan=plan, sampling=SAMPLING,
                               batch_size=4, measures=('variance',), samples=6, probe_steps=6)
  assert again['variance'] == res['variance']            # deterministic given the key


def test_collected_pairs_are_the_generated_tokens(sampler):
  plan = resolve_steps(num_iter=4, preset='mar', upper=6, strategy='constant')
  labels = np.arange(4)
  x, y, step, image = evidence.collect_pairs(sampler, labels, jax.random.key(3), plan=plan,
                                             sampling=SAMPLING, batch_size=4)
  assert x.shape == (4 * 16, 64) and y.shape == (4 * 16, 16)
  tokens = np.asarray(sampler.generate(labels, jax.random.key(3), steps=plan.steps,
                                       max_timestep=None, cfg=2.0))
  for i in range(4):
    rows = y[image == i]
    assert len(rows) == 16                                 # every token exactly once
    assert {tuple(r) for r in rows.round(5)} == {tuple(t) for t in tokens[i].round(5)}
  from disa_jax.systems.mar.plan import mask_schedule

  assert np.bincount(step).tolist() == [4 * n for _, _, n in mask_schedule(4, 16)]


def test_predictability_detects_more_constrained_steps():
  rng = np.random.default_rng(0)
  n_img, per = 500, 4
  x = rng.standard_normal((n_img * per, 8)).astype(np.float32)
  w = rng.standard_normal((8, 3)) / np.sqrt(8)
  step = np.tile(np.arange(per), n_img)                    # token i of an image: AR step i
  noise = np.array([1.0, 0.6, 0.3, 0.0])[step][:, None]   # later steps: less left to chance
  y = (x @ w + noise * rng.standard_normal((len(x), 3))).astype(np.float32)
  image = np.repeat(np.arange(n_img), per)
  res = evidence.predictability(x, y, step, image, steps=1500, hidden=64)
  mse = [r['mse'] for r in res['per_step']]
  assert mse[0] > mse[1] > mse[2] > mse[3]
  assert mse[0] == pytest.approx(1.0, rel=0.25) and mse[3] < 0.1
  assert res['per_step'][3]['r2'] > 0.85 > res['per_step'][0]['r2']
  assert all(r['baseline_mse'] > r['mse'] for r in res['per_step'])
  assert res['test_images'] == 100 and res['train_images'] == 400
  binned = evidence.bin_steps(res['per_step'], 'mse', 2)
  assert [b['ar_step_lo'] for b in binned] == [0, 2] and binned[0]['mse'] > binned[1]['mse']


def test_run_specs_and_curves(sampler):
  assert RunSpec.parse('d=disa:8:20:4:cosine') == RunSpec('d', 'disa', 8, 20, 4, 'cosine')
  assert RunSpec.parse('mar:8:10').strategy == 'constant'
  with pytest.raises(RunSpecError, match='bad run spec'):
    RunSpec.parse('fast:8')
  runs = default_runs(4, upper=6, lower=2, mar_steps=(2, 6))
  assert [r.label for r in runs] == ['mar2', 'mar6', 'disa-linear', 'disa-cosine',
                                     'disa-two-stage']

  class Brightness:
    primary, higher_is_better = 'brightness', True

    def evaluate(self, images, labels):
      return {'brightness': float(images.mean())}

  from disa_jax.tokenizers.image import token_preview

  class Preview:
    def decode(self, tokens):
      return token_preview(sampler.config, tokens, size=4)

  recs = speed_quality(sampler, Preview(), np.arange(6) % 10, runs=runs, sampling=SAMPLING,
                       key=jax.random.key(0), batch_size=4, metric=Brightness())
  assert [r['label'] for r in recs] == [r.label for r in runs]
  evals = {r['label']: r['head_evals_per_image'] for r in recs}
  assert evals['mar2'] == 16 * 2 and evals['mar6'] == 16 * 6
  assert evals['mar2'] < evals['disa-linear'] < evals['mar6']
  for r in recs:
    assert r['generate_s_per_image'] > 0 and 0 <= r['quality'] <= 255


def _evidence_cli(*args):
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO / 'tests'), env.get('PYTHONPATH', '')])
  cmd = [sys.executable, '-m', 'disa_jax.cli.evidence',
         f'--config={REPO}/configs/mar_base.py:tiny', '--config.model.vae_stride=8',
         '--config.model.patch_size=2', '--config.model.vae_embed_dim=3',
         '--config.tokenizer.kind=pixels', '--num-iter=4', '--batch-size=4',
         f'--config.runtime.compilation_cache={CACHE}', *args]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.mark.slow
def test_evidence_cli_all(tmp_path):
  out = tmp_path / 'ev'
  r = _evidence_cli('all', '--num-images=10', '--samples=4', '--straightness-samples=2',
                    '--probe-steps=4', '--mlp-steps=50', '--mar-steps=2,4', '--upper-steps=4',
                    '--lower-steps=2', '--metric=custom_metric:MeanBrightness', f'--out={out}')
  assert r.returncode == 0, r.stderr
  names = sorted(os.listdir(out))
  assert names == sorted(f'{n}.{e}' for n in ('variance', 'straightness', 'predictability',
                                              'curves') for e in ('json', 'png'))
  var = json.loads((out / 'variance.json').read_text())
  assert len(var['per_step']) == 4 and var['samples_per_token'] == 4
  assert var['command'].startswith('disa-evidence ') and ' all ' in var['command']
  pred = json.loads((out / 'predictability.json').read_text())
  assert len(pred['per_step']) == 4 and pred['test_images'] == 2
  cur = json.loads((out / 'curves.json').read_text())
  assert [x['label'] for x in cur['runs']] == ['mar2', 'mar4', 'disa-linear', 'disa-cosine',
                                               'disa-two-stage']
  assert cur['primary'] == 'brightness' and cur['num_images'] == 10
  for n in names:
    if n.endswith('.png'):
      assert (out / n).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # files are not replaced without --overwrite
  r = _evidence_cli('variance', f'--out={out}')
  assert r.returncode == 2 and 'variance.json already exists' in r.stderr


@pytest.mark.parametrize('args,message', [
  ([], 'name what to measure'),
  (['speed'], "unknown command 'speed'"),
  (['curves', '--runs=fast:8'], 'bad run spec'),
  (['curves', '--metric=none'], 'curves need a quality metric'),
  (['variance', '--num-iter=99'], '--num_iter must be in [1, 16]'),
])
def test_evidence_cli_bad_input(tmp_path, args, message):
  r = _evidence_cli(*args, f'--out={tmp_path / "o"}')
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert message in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'o').exists()
