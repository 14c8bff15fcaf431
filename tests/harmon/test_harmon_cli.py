"""Harmon through the shared commands: `disa-sample` end to end on the tiny config (a converted
checkpoint, a KL-16 VAE directory, a tokenizer.json built offline with the `tokenizers`
library, repeated --prompt flags and a prompts file), the sampler contract (per-image
randomness independent of the batch), and bad inputs of the new flags (one `error:` line,
exit status 2, nothing written)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO
from harmon_helpers import tiny_harmon, write_tokenizer_json

from disa_jax.errors import UserError

torch = pytest.importorskip('torch')
pytest.importorskip('tokenizers')

TINY = f'--config={REPO}/configs/harmon/0_5b.py:tiny'
FAST = ('--num_iter=2', '--upper_steps=3', '--lower_steps=2')


def run_cli(*args, tool='sample'):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=str(REPO))
  cmd = [sys.executable, '-m', f'disa_jax.cli.{tool}', *args,
         f'--config.runtime.compilation_cache={CACHE}']
  if tool == 'sample':
    cmd.append('--noprogress')
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  return write_tokenizer_json(tmp_path_factory.mktemp('harmon_tok') / 'tokenizer.json')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """tokenizer.json, a converted tiny Harmon and a small converted KL-16 VAE."""
  from flax import nnx
  from helpers import SMALL_VAE, torch_vae

  from disa_jax.convert.cli import main as convert_main
  from disa_jax.convert.mapping import flax_state_to_torch
  from disa_jax.systems.harmon.convert import convert
  from disa_jax.tokenizers.kl16 import VAEConfig

  d = tmp_path_factory.mktemp('harmon_cli')
  write_tokenizer_json(d / 'tokenizer.json')
  sd = {k: torch.as_tensor(np.array(v)) for k, v in
        flax_state_to_torch(nnx.state(tiny_harmon(seed=3))).items()}
  torch.save(sd, d / 'harmon_tiny.pth')
  convert(d / 'harmon_tiny.pth', d / 'harmon', num_heads=14, mar_num_heads=4)
  torch.save({'model': torch_vae(VAEConfig(**SMALL_VAE), seed=1).state_dict()}, d / 'kl16.ckpt')
  assert convert_main(['vae', '--torch-checkpoint', str(d / 'kl16.ckpt'),
                       '--out', str(d / 'kl16')]) == 0
  (d / 'prompts.txt').write_text('a red apple\n\na photo of a cat\n')
  return d


@pytest.mark.slow   # ~1-2 min of compiles on the shared 2-core machine
def test_sample_writes_images_and_grid(files, tmp_path):
  out = tmp_path / 'out'
  r = run_cli(TINY, f'--checkpoint={files / "harmon"}', f'--vae={files / "kl16"}',
              f'--tokenizer={files / "tokenizer.json"}', '--prompt=a red apple',
              '--prompt=a photo of a cat', '--num_images=3', '--batch_size=2', *FAST,
              f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert f'checkpoint {files / "harmon"}' in r.stdout
  assert sorted(os.listdir(out / 'images')) == ['000000.png', '000001.png', '000002.png']
  from PIL import Image

  img = np.asarray(Image.open(out / 'images' / '000002.png'))
  assert img.shape == (128, 128, 3) and img.std() > 0      # 8 x 8 tokens x 16 px
  assert np.asarray(Image.open(out / 'grid.png')).shape[0] >= 128
  assert list(np.load(out / 'labels.npy')) == [0, 1, 0]    # prompt indices, cycled
  # the prompt of image i is line i + 1 of prompts.txt
  assert (out / 'prompts.txt').read_text() == 'a red apple\na photo of a cat\na red apple\n'
  m = json.loads((out / 'metrics.json').read_text())
  assert m['num_images'] == 3 and m['num_iter'] == 2 and m['steps_requested'] == [3, 3]
  # one prefill, one init, then the backbone / head buckets; every batch reuses them
  assert m['compilations']['total'] == 2 + m['compilations']['backbone'] + \
    m['compilations']['head']


@pytest.mark.slow
def test_sample_prompts_file_disa(files, tmp_path):
  out = tmp_path / 'out'
  r = run_cli(TINY, f'--tokenizer={files / "tokenizer.json"}',
              f'--prompts_file={files / "prompts.txt"}', '--num_images=2', '--preset=disa',
              *FAST, f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert 'RANDOM WEIGHTS' in r.stdout
  assert np.load(out / 'tokens.npy').shape == (2, 64, 16)
  assert (out / 'prompts.txt').read_text().splitlines() == ['a red apple', 'a photo of a cat']
  m = json.loads((out / 'metrics.json').read_text())
  assert m['max_timestep'] == 950 and m['steps_requested'] == [3, 2]


@pytest.mark.parametrize('args,message', [
  (['--prompt=a cat'], 'no text tokenizer given; pass --tokenizer='),
  (['--tokenizer=TOK'], 'no prompt given; pass --prompt='),
  pytest.param(['--tokenizer=/nonexistent/tokenizer.json', '--prompt=a cat'],
               'tokenizer file /nonexistent/tokenizer.json does not exist',
               marks=pytest.mark.slow),
  pytest.param(['--tokenizer=TOK', '--prompts_file=/nonexistent/p.txt'],
               'prompts file /nonexistent/p.txt does not exist', marks=pytest.mark.slow),
  pytest.param(['--tokenizer=TOK', '--prompt=   '], '--prompt must be one non-empty line',
               marks=pytest.mark.slow),
])
def test_bad_inputs(tokenizer, tmp_path, args, message):
  """~30 s each (a fresh process importing jax); three rows run with the slow tests."""
  out = tmp_path / 'out'
  args = [a.replace('TOK', str(tokenizer)) for a in args]
  r = run_cli(TINY, *args, f'--out={out}')
  assert r.returncode == 2, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr
  assert not out.exists() and not (tmp_path / 'out.partial').exists()


def test_per_image_randomness_is_independent_of_the_batch(tokenizer):
  """Image k's tokens depend on (key, k) only: batch [0, 1, 2, 3] and batch [2, 3] agree."""
  from disa_jax.systems.harmon.config import harmon_config
  from disa_jax.systems.harmon.system import SYSTEM

  c = harmon_config('harmon_0_5b', tiny=True)
  with c.unlocked():
    c.tokenizer.text = str(tokenizer)
    c.sampling.prompt = 'a red apple\na photo of a cat'
  SYSTEM.validate(c)
  model, _ = SYSTEM.build_model(c, seed=0)
  sampler = SYSTEM.make_sampler(model, c, None)
  conds = SYSTEM.conditions(c, 4)
  steps = [3, 2]
  key = jax.random.key(7)
  kw = dict(steps=steps, max_timestep=950, cfg=3.0, cfg_schedule='constant')
  full = np.asarray(sampler.generate(conds, key, image_ids=np.arange(4), **kw))
  part = np.asarray(sampler.generate(conds[2:], key, image_ids=np.arange(2, 4), **kw))
  np.testing.assert_allclose(part, full[2:], rtol=1e-5, atol=1e-5)
  assert not np.allclose(full[0], full[2])     # same prompt, different image id
  assert sampler.last_stats.compiles.get('prefill', 0) == 1   # new batch size: new prefill


@pytest.mark.slow   # four settings, each compiled and timed twice (fused and phase-split)
def test_bench_compares_baseline_and_three_disa_settings(tmp_path):
  out = tmp_path / 'bench.json'
  r = run_cli(TINY, '--batch_size=1', '--config.sampling.num_iter=2', f'--json_out={out}',
              tool='bench')
  assert r.returncode == 0, r.stderr
  for name in ('baseline', 'disa_100_5', 'disa_50_5', 'disa_25_5'):
    assert name in r.stdout
  res = json.loads(out.read_text())
  s = res['settings']
  assert s['baseline']['steps_requested'] == 200 and s['disa_25_5']['steps_requested'] == 30
  for e in s.values():
    assert set(e['jax_phase_s']) == {'encoder', 'llm', 'decoder', 'head'}
    assert all(v > 0 for v in e['jax_phase_s'].values())
  # the head's FLOPs follow the steps; the backbone's do not
  assert s['baseline']['tflop_per_image']['head'] > 3 * s['disa_25_5']['tflop_per_image']['head']
  assert s['baseline']['tflop_per_image']['llm'] == s['disa_25_5']['tflop_per_image']['llm']


@pytest.mark.slow   # two samplers compiled (one on 8 devices): minutes on the shared CPU
@pytest.mark.parametrize('fsdp', [1, 4])
def test_eight_devices_give_the_same_tokens_as_one(tokenizer, fsdp):
  """8 (fake CPU) devices give the tokens of one device. fsdp=1: the batch over the data axis,
  parameters replicated (cond / uncond rows of an image stay on one device); runtime.fsdp=4:
  mesh (data 2, fsdp 4), the large parameters split over `fsdp`, the rows over both axes."""
  from disa_jax.engine import runner
  from disa_jax.systems.harmon.config import harmon_config
  from disa_jax.systems.harmon.system import SYSTEM

  assert jax.device_count() == 8
  c = harmon_config('harmon_0_5b', tiny=True)
  with c.unlocked():
    c.tokenizer.text = str(tokenizer)
    c.sampling.prompt = 'a red apple\na photo of a cat\ntwo dogs'
    c.runtime.fsdp = fsdp
  model, _ = SYSTEM.build_model(c, seed=1)
  conds = SYSTEM.conditions(c, 8)
  kw = dict(steps=[3, 2], max_timestep=950, cfg=3.0, cfg_schedule='constant',
            image_ids=np.arange(8))
  key = jax.random.key(3)
  one = np.asarray(SYSTEM.make_sampler(model, c, None).generate(conds, key, **kw))
  mesh = runner.make_mesh(c)
  assert dict(mesh.shape) == ({'data': 8} if fsdp == 1 else {'data': 2, 'fsdp': 4})
  sharded = SYSTEM.make_sampler(model, c, mesh)
  specs = [tuple(getattr(x.sharding, 'spec', ())) for x in jax.tree.leaves(sharded.inner.state)]
  split = sum('fsdp' in sp for sp in specs)
  assert split == 0 if fsdp == 1 else split >= 10              # the big matrices are split
  out = sharded.generate(conds, key, **kw)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), one, rtol=1e-5, atol=1e-5)
  if fsdp > 1:
    with c.unlocked():
      c.runtime.fsdp = 3
    with pytest.raises(UserError, match='runtime.fsdp=3 does not divide the 8 devices'):
      runner.make_mesh(c)


def test_bench_rows_fit_the_gpu_suite_table():
  """Harmon's disa-bench result carries the common per-run fields the GPU suite tabulates."""
  sys.path.insert(0, str(REPO / 'bench'))
  import gpu_suite

  from disa_jax.systems.harmon.bench import summary_runs

  def entry(s, head):
    return {'jax_s': s, 'compile_s': 1.0, 'jax_phase_s': {'encoder': 0.1, 'llm': 0.2,
                                                          'decoder': 0.1, 'head': head},
            'tflop_per_image_as_run': {'total': 0.5}, 'speedup_vs_baseline': 4.0 / s,
            'flop_ratio_vs_baseline': 1.1}
  result = {'batch': 2, 'backend': 'cpu', 'settings': {
    'baseline': entry(4.0, 3.0), 'disa_50_5': entry(1.0, 0.5)}}
  result.update(summary_runs(result, num_iter=8, dtype='float32'))
  job = next(j for j in gpu_suite.JOBS if j.name == 'Harmon-1.5B b16')
  rows = gpu_suite.rows(job, result)
  assert [r['run'] for r in rows] == ['baseline', 'disa_50_5']
  assert rows[1]['speedup'] == 4.0 and rows[1]['steps'] == '50->5 linear'
  assert rows[0]['s_per_image'] == 2.0 and rows[0]['images_per_s'] == 0.5
  table = gpu_suite.markdown({'mode': 'dry run', 'device': 'cpu', 'total_s': 1, 'budget_s': 2,
                              'rows': rows, 'jobs': []})
  assert '| Harmon-1.5B b16 | disa_50_5 |' in table
