"""disa-eval end to end (subprocesses): Inception metrics on a tiny pixel model, resuming an
interrupted run, custom metrics, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CACHE, REPO

# The tiny 16-token MAR with a 3-channel pixel tokenizer: 8 x 8 RGB images.
TINY_PIXELS = [f'--config={REPO}/configs/mar_base.py:tiny', '--config.model.vae_stride=8',
               '--config.model.patch_size=2', '--config.model.vae_embed_dim=3',
               '--config.tokenizer.kind=pixels', '--num-iter=4']


def run_eval(*args, devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO / 'tests'), env.get('PYTHONPATH', '')])
  cmd = [sys.executable, '-m', 'disa_jax.cli.eval', *TINY_PIXELS, *args,
         f'--config.runtime.compilation_cache={CACHE}', '--noprogress']
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.fixture(scope='module')
def reference(random_inception, tmp_path_factory):
  """ADM-style reference batch (mu/sigma, mu_s/sigma_s, arr_0) from 6 random images."""
  from disa_jax.eval.frechet import feature_stats
  from disa_jax.eval.inception import InceptionExtractor, load_inception

  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  f = InceptionExtractor(load_inception(random_inception[2]), batch_size=2)(images)
  path = tmp_path_factory.mktemp('ref') / 'ref.npz'
  mu, sigma = feature_stats(f['pool'])
  mu_s, sigma_s = feature_stats(f['spatial'])
  np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=images)
  return path


def _read_pngs(directory):
  from PIL import Image

  names = sorted(os.listdir(directory))
  return names, np.stack([np.asarray(Image.open(directory / n)) for n in names])


@pytest.mark.slow
def test_inception_eval_and_resume_reproduce_the_same_images(random_inception, reference,
                                                             tmp_path):
  common = ['--num-images=10', '--batch-size=4', '--save-images', '--inception-batch-size=2',
            f'--inception={random_inception[2]}', f'--ref-stats={reference}']
  full = tmp_path / 'full'
  r = run_eval(*common, f'--out={full}')
  assert r.returncode == 0, r.stderr
  m = json.loads((full / 'metrics.json').read_text())
  res = m['metrics']
  assert set(res) >= {'fid', 'inception_score', 'inception_score_std', 'sfid', 'precision',
                      'recall', 'num_images'}
  assert res['num_images'] == 10 and m['primary'] == 'fid' and not m['higher_is_better']
  assert res['fid'] > 0 and np.isfinite(res['sfid']) and 0 <= res['precision'] <= 1
  t = m['timing']
  assert t['generate_s'] > 0 and t['decode_s'] >= 0 and t['features_s'] > 0
  assert t['total_s'] >= t['generate_s'] + t['features_s'] - 1e-3
  assert t['generate_s_per_image'] == pytest.approx(t['generate_s'] / 10, rel=1e-3)
  assert m['batches_run'] == 3 and m['batches_reused'] == 0
  assert 'fid' in r.stdout and 's/image' in r.stdout
  names, images = _read_pngs(full / 'images')
  assert names == [f'{i:06d}.png' for i in range(10)] and images.shape == (10, 8, 8, 3)
  # labels in the official order (10 classes x 1 image here)
  shards = sorted(os.listdir(full / 'shards'))
  labels = np.concatenate([np.load(full / 'shards' / s)['labels'] for s in shards])
  np.testing.assert_array_equal(labels, np.arange(10))
  assert not (tmp_path / 'full.partial').exists()

  # Interrupted after one batch; a killed process also left temporary files behind.
  part = tmp_path / 'resumed'
  r = run_eval(*common, f'--out={part}', '--max-batches=1')
  assert r.returncode == 0, r.stderr
  assert 'run the same command again to continue' in r.stdout
  partial = tmp_path / 'resumed.partial'
  assert not part.exists() and sorted(os.listdir(partial / 'shards')) == ['b0000000.p000.npz']
  assert len(os.listdir(partial / 'images')) == 4
  (partial / 'images' / '.000005.png.tmp').write_bytes(b'half a png')
  (partial / 'shards' / 'b0000004.p000.npz.tmp.npz').write_bytes(b'half a shard')
  r = run_eval(*common, f'--out={part}')
  assert r.returncode == 0, r.stderr
  m2 = json.loads((part / 'metrics.json').read_text())
  assert m2['batches_reused'] == 1 and m2['batches_run'] == 2
  names2, images2 = _read_pngs(part / 'images')
  assert names2 == names
  np.testing.assert_array_equal(images2, images)           # exactly the same image set
  assert m2['metrics'] == res                               # and the same numbers
  assert sorted(os.listdir(part / 'shards')) == shards


def test_custom_non_streaming_metric_sees_images_in_id_order(tmp_path):
  out = tmp_path / 'bright'
  r = run_eval('--metric=custom_metric:MeanBrightness', '--num-images=20', '--batch-size=4',
               '--save-images', f'--out={out}')
  assert r.returncode == 0, r.stderr
  m = json.loads((out / 'metrics.json').read_text())
  _, images = _read_pngs(out / 'images')
  assert m['metrics']['num_images'] == 20 and m['primary'] == 'brightness'
  assert m['metrics']['brightness'] == pytest.approx(images.astype(np.float64).mean())
  assert m['metrics']['first_image_sum'] == float(images[0].astype(np.float64).sum())
  assert m['metrics']['label_0_brightness'] == pytest.approx(images[:2].mean())


@pytest.mark.parametrize('args,message', [
  (['--metric=none', '--num-images=15'], '--num_images (15) must be a multiple of the 10 classes'),
  (['--metric=inception'], '--metric=inception needs --inception DIR and --ref_stats FILE'),
  (['--metric=inception', '--inception=/no/inc', '--ref-stats=/no/ref.npz'],
   'reference statistics file /no/ref.npz does not exist'),
  (['--metric=nosuch'], "unknown quality metric 'nosuch'"),
  (['--metric=none', '--config.tokenizer.kind=none'], 'disa-eval needs images'),
  (['--metric=none', '--upper-steps=2', '--lower-steps=3'], 'upper steps (2) must be >= lower'),
])
def test_eval_bad_input_one_line_error(tmp_path, args, message):
  out = tmp_path / 'bad'
  r = run_eval('--num-images=10', *args, f'--out={out}')
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = [ln for ln in r.stderr.splitlines() if ln.startswith('error:')]
  assert lines and message in lines[0], r.stderr
  assert 'Traceback' not in r.stderr
  assert not out.exists() and not (tmp_path / 'bad.partial').exists()


def test_eval_refuses_to_continue_a_run_with_other_settings(tmp_path):
  out = tmp_path / 'run'
  r = run_eval('--metric=none', '--num-images=10', '--batch-size=4', '--max-batches=1',
               f'--out={out}')
  assert r.returncode == 0, r.stderr
  r = run_eval('--metric=none', '--num-images=10', '--batch-size=4', '--cfg=3.0',
               f'--out={out}')
  assert r.returncode == 2 and 'holds an interrupted run with other settings (cfg: was 2.0, now 3.0)' in r.stderr
  r = run_eval('--metric=none', '--num-images=10', '--batch-size=4', '--cfg=3.0',
               '--overwrite', f'--out={out}')
  assert r.returncode == 0, r.stderr
  m = json.loads((out / 'metrics.json').read_text())
  assert m['metrics'] is None and m['cfg'] == 3.0 and m['batches_reused'] == 0
  assert m['timing']['generate_s'] > 0
