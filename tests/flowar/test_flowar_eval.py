"""disa-eval on FlowAR samples (subprocesses, tiny config, random weights, a small random KL-16
VAE, the toy `custom_metric:MeanBrightness` metric): an interrupted evaluation continued with
the same command gives the metrics and images of an uninterrupted one; continuing with another
`guidance` (a setting that changes FlowAR's images) is refused, naming it."""

import json
import os

import eval_helpers
import numpy as np
import pytest
from eval_helpers import pngs, small_vae_dir

COMMON = ['--config=configs/flowar/s.py:tiny', '--config.tokenizer.kind=kl16',
          '--metric=custom_metric:MeanBrightness', '--classes=3,5', '--num-images=4',
          '--batch-size=2', '--save-images', '--noprogress']


@pytest.fixture(scope='module')
def vae(tmp_path_factory):
  return small_vae_dir(tmp_path_factory.mktemp('vae') / 'kl16')


def run_eval(*args):
  return eval_helpers.run_eval(*COMMON, *args)


@pytest.mark.slow      # three evaluations with compiles: ~1-2 min on the shared 2-core machine
def test_eval_resume_equals_uninterrupted_and_guidance_is_fingerprinted(vae, tmp_path):
  full, part = tmp_path / 'full', tmp_path / 'part'
  r = run_eval(f'--vae={vae}', f'--out={full}')
  assert r.returncode == 0, r.stderr
  m = json.loads((full / 'metrics.json').read_text())
  assert m['metrics']['num_images'] == 4 and m['steps_actual'] and m['num_iter'] == 5
  names, images = pngs(full / 'images')
  assert names == [f'{i:06d}.png' for i in range(4)] and images.shape == (4, 256, 256, 3)
  assert np.abs(images[0].astype(int) - images[2]).max() > 0      # both class 3, other noise
  r = run_eval(f'--vae={vae}', f'--out={part}', '--max-batches=1')
  assert r.returncode == 0, r.stderr
  assert not part.exists() and len(os.listdir(tmp_path / 'part.partial' / 'images')) == 2
  r = run_eval(f'--vae={vae}', f'--out={part}', '--config.sampling.guidance=0.5')
  assert r.returncode == 2 and r.stderr.count('\n') == 1
  assert 'other settings (sampling_other: was' in r.stderr and 'guidance' in r.stderr
  r = run_eval(f'--vae={vae}', f'--out={part}')
  assert r.returncode == 0, r.stderr
  resumed = json.loads((part / 'metrics.json').read_text())
  assert resumed['batches_reused'] == 1 and resumed['batches_run'] == 1
  assert resumed['metrics'] == m['metrics']
  assert np.array_equal(pngs(part / 'images')[1], images)


def test_fingerprint_covers_every_sampling_setting(tmp_path):
  """A setting that changes the images but not the step plan (FlowAR's guidance, MAR's head
  solver, Harmon's prompts file content) changes the resume fingerprint."""
  from disa_jax.cli.eval import fingerprint
  from disa_jax.schedules import StepPlan
  from disa_jax.systems.flowar.config import flowar_config
  from disa_jax.systems.harmon.config import harmon_config
  from disa_jax.systems.mar.variants import digits_config

  def fp(config):
    return fingerprint(config, StepPlan(steps=(2, 2), max_timestep=None), np.arange(4),
                       metric='none', inception=None, ref_stats=None, save_images=False)

  def changed(config, **fields):
    before = fp(config)
    with config.unlocked():
      config.sampling.update(fields)
    after = fp(config)
    return sorted(k for k in before if before[k] != after[k])

  assert changed(flowar_config('S', 'tiny'), guidance=0.5) == ['sampling_other']
  assert changed(digits_config(tiny=True), solver='ddim') == ['sampling_other']
  assert changed(flowar_config('S', 'tiny'), cfg=3.0) == ['cfg']
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a cat\n')
  c = harmon_config('harmon_0_5b', tiny=True)
  with c.unlocked():
    c.sampling.prompts_file = str(prompts)
  before = fp(c)
  prompts.write_text('a dog\n')                        # same path, other prompts
  assert fp(c)['sampling_other'] != before['sampling_other']
