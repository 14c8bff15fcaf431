"""disa-eval on xAR samples (subprocesses, tiny config, random weights, a small random KL-16
VAE, the toy `custom_metric:MeanBrightness` metric): an interrupted evaluation continued with
the same command gives the metrics and images of an uninterrupted one (image i's noise depends on
(seed, i) only); continuing with another cfg is refused, naming it."""

import json
import os

import eval_helpers
import numpy as np
import pytest
from eval_helpers import pngs, small_vae_dir

COMMON = ['--config=configs/xar/b.py:tiny', '--config.tokenizer.kind=kl16',
          '--metric=custom_metric:MeanBrightness', '--classes=3,5', '--num-images=4',
          '--batch-size=2', '--save-images', '--noprogress']


@pytest.fixture(scope='module')
def vae(tmp_path_factory):
  return small_vae_dir(tmp_path_factory.mktemp('vae') / 'kl16')


def run_eval(*args):
  return eval_helpers.run_eval(*COMMON, *args)


@pytest.mark.slow      # three evaluations with compiles: ~1-2 min on the shared 2-core machine
def test_eval_resume_equals_uninterrupted(vae, tmp_path):
  full, part = tmp_path / 'full', tmp_path / 'part'
  r = run_eval(f'--vae={vae}', f'--out={full}')
  assert r.returncode == 0, r.stderr
  m = json.loads((full / 'metrics.json').read_text())
  assert m['metrics']['num_images'] == 4 and m['num_iter'] == 4
  assert m['steps_actual'] == [6, 5, 4, 3]
  names, images = pngs(full / 'images')
  assert names == [f'{i:06d}.png' for i in range(4)] and images.shape == (4, 256, 256, 3)
  assert np.abs(images[0].astype(int) - images[2]).max() > 0      # both class 3, other noise
  r = run_eval(f'--vae={vae}', f'--out={part}', '--max-batches=1')
  assert r.returncode == 0, r.stderr
  assert not part.exists() and len(os.listdir(tmp_path / 'part.partial' / 'images')) == 2
  r = run_eval(f'--vae={vae}', f'--out={part}', '--cfg=3.0')
  assert r.returncode == 2 and r.stderr.count('\n') == 1
  assert 'other settings (cfg: was 2.0, now 3.0)' in r.stderr
  r = run_eval(f'--vae={vae}', f'--out={part}')
  assert r.returncode == 0, r.stderr
  resumed = json.loads((part / 'metrics.json').read_text())
  assert resumed['batches_reused'] == 1 and resumed['batches_run'] == 1
  assert resumed['metrics'] == m['metrics']
  assert np.array_equal(pngs(part / 'images')[1], images)
