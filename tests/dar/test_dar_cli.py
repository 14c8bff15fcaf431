"""D-AR through the commands (subprocesses, tiny config): disa-convert dar / dar-tokenizer,
disa-sample with previews, layout prefixes from an image and from a sample, disa-bench's knob
table, disa-eval with the Inception pipeline, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CACHE, REPO

TINY = f'--config={REPO}/configs/dar/l.py:tiny'


def run_cli(tool, *args, cache=True):
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(REPO / 'tests')])
  extra = [f'--config.runtime.compilation_cache={CACHE}'] if cache else []
  if tool in ('sample', 'eval'):
    extra.append('--noprogress')
  cmd = [sys.executable, '-m', f'disa_jax.{tool}', *args, *extra]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def _pngs(directory):
  from PIL import Image

  return np.stack([np.asarray(Image.open(directory / n)) for n in sorted(os.listdir(directory))])


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Official-format files of the tiny reference models, converted with disa-convert."""
  import torch
  from dar_helpers import SETTINGS, gpt_pair, tokenizer_pair

  tmp = tmp_path_factory.mktemp('dar_convert')
  tok_model, _, _ = tokenizer_pair(0)
  official = {'model': {'num_all_queries': SETTINGS['num_queries'],
                        'num_query_groups': SETTINGS['num_groups'],
                        'queries_per_step': SETTINGS['queries_per_group'],
                        'num_denoising_steps': SETTINGS['num_steps'], 'sampling_resolution': 64}}
  torch.save({'ema': tok_model.state_dict(), 'config': official}, tmp / 'tokenizer.pt')
  _, _, gpt_path = gpt_pair(0)
  outs = {}
  for kind, src in (('dar-tokenizer', tmp / 'tokenizer.pt'), ('dar', gpt_path)):
    out = tmp / kind
    r = run_cli('convert.cli', kind, f'--torch-checkpoint={src}', f'--out={out}', cache=False)
    assert r.returncode == 0, r.stderr
    assert f'wrote {out}' in r.stdout
    outs[kind] = out
  return outs


def test_convert_then_sample_with_layout_and_previews(converted, tmp_path):
  from PIL import Image

  from disa_jax.systems.dar import TokenizerRunner, load_tokenizer
  from disa_jax.systems.dar.commands import load_reference

  ref = (np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)
  Image.fromarray(ref).save(tmp_path / 'ref.png')
  out = tmp_path / 'layout'
  r = run_cli('cli.sample', TINY, f'--checkpoint={converted["dar"]}',
              f'--tokenizer-checkpoint={converted["dar-tokenizer"]}', '--num-images=3',
              '--batch-size=2', '--classes=1,4', '--previews', '--save-tokens',
              f'--layout-from={tmp_path / "ref.png"}', '--prefix-groups=2', f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ['.disa_jax-output', 'grid.png', 'images', 'labels.npy',
                                     'metrics.json', 'previews', 'tokens.npy']
  ids = np.load(out / 'tokens.npy')
  tok = TokenizerRunner(load_tokenizer(converted['dar-tokenizer']))
  want = tok.encode(load_reference(str(tmp_path / 'ref.png'), 64)[None])[0, :8]
  assert ids.shape == (3, 16) and (ids[:, :8] == want).all()
  assert list(np.load(out / 'labels.npy')) == [1, 4, 1]
  images, strips = _pngs(out / 'images'), _pngs(out / 'previews')
  assert images.shape == (3, 64, 64, 3) and strips.shape == (3, 64, 4 * 64, 3)
  np.testing.assert_array_equal(strips[:, :, 3 * 64:], images)      # last preview = the image
  m = json.loads((out / 'metrics.json').read_text())
  assert m['prefix_ids'] == 8 and m['stages'] == 4 and m['num_images'] == 3
  assert m['compilations'] == {'prefill': 1, 'step': 1, 'tokenizer_conditions': 1,
                               'tokenizer_encode': 1, 'tokenizer_step': 1}
  assert 'RANDOM' not in m['model']


def test_speculative_sample_with_the_target_as_draft_equals_the_plain_run(converted, tmp_path):
  """--draft: with the target itself as the draft every id is accepted, so the ids and the
  images are the plain run's (the drafts use the plain loop's draws)."""
  common = [f'--checkpoint={converted["dar"]}',
            f'--tokenizer-checkpoint={converted["dar-tokenizer"]}', '--num-images=3',
            '--batch-size=2', '--save-tokens', '--config.sampling.cfg=2.0']
  plain, spec = tmp_path / 'plain', tmp_path / 'spec'
  r = run_cli('cli.sample', TINY, *common, f'--out={plain}')
  assert r.returncode == 0, r.stderr
  r = run_cli('cli.sample', TINY, *common, f'--draft={converted["dar"]}', '--draft-tokens=3',
              '--speculate-from=5', f'--out={spec}')
  assert r.returncode == 0, r.stderr
  np.testing.assert_array_equal(np.load(spec / 'tokens.npy'), np.load(plain / 'tokens.npy'))
  assert np.abs(_pngs(spec / 'images').astype(int)
                - _pngs(plain / 'images').astype(int)).max() <= 1
  m = json.loads((spec / 'metrics.json').read_text())
  sp = m['speculation']
  assert sp['acceptance'] == 1.0 and sp['target_passes'] == 2 * 4     # 11 ids, 3 per pass
  assert m['compilations']['verify'] == 1 and m['compilations']['draft_round'] == 1


def test_sample_prefix_from_sample_and_batch_independence(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  r = run_cli('cli.sample', TINY, '--num-images=3', '--batch-size=3', '--prefix-from-sample',
              '--prefix-groups=1', '--save-tokens', f'--out={a}')
  assert r.returncode == 0, r.stderr
  r = run_cli('cli.sample', TINY, '--num-images=3', '--batch-size=2', '--prefix-from-sample',
              '--prefix-groups=1', '--save-tokens', f'--out={b}')
  assert r.returncode == 0, r.stderr
  ia, ib = np.load(a / 'tokens.npy'), np.load(b / 'tokens.npy')
  assert (ia[:, :4] == ia[0, :4]).all() and not (ia[:, 4:] == ia[0, 4:]).all()
  np.testing.assert_array_equal(ia, ib)                      # batch size does not matter
  diff = np.abs(_pngs(a / 'images').astype(int) - _pngs(b / 'images').astype(int))
  assert diff.max() <= 1


def test_bench_knob_table(tmp_path):
  r = run_cli('cli.bench', TINY, '--batch-size=2', '--runs=full,stop=8,grid=2', '--json',
              f'--json-out={tmp_path / "b.json"}')
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout)
  rows = {row['run']: row for row in res['runs']}
  assert list(rows) == ['full', 'stop=8', 'grid=2'] and res['system'] == 'dar'
  assert rows['full']['mean_abs_diff_to_full'] == 0 and rows['full']['tokens'] == 16
  assert rows['stop=8']['tokens'] == 8 and rows['grid=2']['tokens'] == 12
  assert rows['grid=2']['decoder_steps_run'] == 2 and rows['stop=8']['decoder_steps_run'] == 2
  for name in ('stop=8', 'grid=2'):
    assert rows[name]['mean_abs_diff_to_full'] > 0 and rows[name]['tokens_per_s'] > 0
  assert json.loads((tmp_path / 'b.json').read_text())['runs'] == res['runs']


def test_bench_speculative_runs(tmp_path):
  r = run_cli('cli.bench', TINY, '--batch-size=2', '--draft=random:toy', '--runs=full,spec=2',
              '--json')
  assert r.returncode == 0, r.stderr
  rows = {row['run']: row for row in json.loads(r.stdout)['runs']}
  assert list(rows) == ['full', 'spec=2'] and 'speculation' not in rows['full']
  sp = rows['spec=2']['speculation']
  assert rows['spec=2']['tokens'] == 16 and rows['spec=2']['draft_s'] > 0
  assert len(sp['acceptance_per_group']) == 4 and 0 <= sp['acceptance'] <= 1
  assert sp['target_passes'] >= -(-8 // 2)     # ids 8..15 drafted, at most 2 per pass
  assert 1.0 <= sp['ids_per_row_pass'] <= 2.0


@pytest.mark.slow
def test_eval_fid_through_the_inception_pipeline(random_inception, tmp_path):
  from disa_jax.eval.frechet import feature_stats
  from disa_jax.eval.inception import InceptionExtractor, load_inception

  images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
  f = InceptionExtractor(load_inception(random_inception[2]), batch_size=2)(images)
  mu, sigma = feature_stats(f['pool'])
  np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
  out = tmp_path / 'eval'
  r = run_cli('cli.eval', TINY, '--num-images=10', '--batch-size=5', '--save-images',
              f'--inception={random_inception[2]}', f'--ref-stats={tmp_path / "ref.npz"}',
              '--inception-batch-size=5', f'--out={out}')
  assert r.returncode == 0, r.stderr
  m = json.loads((out / 'metrics.json').read_text())
  assert m['metric'] == 'inception' and np.isfinite(m['metrics']['fid'])
  assert m['metrics']['fid'] > 0 and m['timing']['num_images'] == 10
  assert len(os.listdir(out / 'images')) == 10


@pytest.mark.slow
def test_eval_resumes_to_the_uninterrupted_result(tmp_path):
  """disa-eval stopped after one batch (--max-batches=1) and continued by the same command gives
  the metrics and images of an uninterrupted run; continuing with another cfg is refused."""
  common = ['--classes=1,2', '--num-images=4', '--batch-size=2', '--save-images',
            '--metric=custom_metric:MeanBrightness']
  full, part = tmp_path / 'full', tmp_path / 'part'
  r = run_cli('cli.eval', TINY, *common, f'--out={full}')
  assert r.returncode == 0, r.stderr
  m = json.loads((full / 'metrics.json').read_text())
  assert m['metrics']['num_images'] == 4 and m['batches_run'] == 2
  r = run_cli('cli.eval', TINY, *common, f'--out={part}', '--max-batches=1')
  assert r.returncode == 0, r.stderr
  assert 'stopped after 1 batches' in r.stdout and not part.exists()
  assert len(os.listdir(tmp_path / 'part.partial' / 'images')) == 2
  r = run_cli('cli.eval', TINY, *common, f'--out={part}', '--cfg=3.0')
  err = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(err) == 1 and 'interrupted run with other settings' in err[0]
  r = run_cli('cli.eval', TINY, *common, f'--out={part}')
  assert r.returncode == 0, r.stderr
  resumed = json.loads((part / 'metrics.json').read_text())
  assert resumed['batches_reused'] == 1 and resumed['batches_run'] == 1
  assert resumed['metrics'] == m['metrics']
  assert np.array_equal(_pngs(part / 'images'), _pngs(full / 'images'))
  assert not (tmp_path / 'part.partial').exists()


@pytest.mark.parametrize('args,message', [
  (['--prefix-groups=2'], '--prefix-groups needs --layout-from=IMAGE or --prefix-from-sample'),
  (['--layout-from=/no/such.png', '--prefix-groups=1'], '--layout-from: no such image file'),
  (['--layout-from=README.md', '--prefix-groups=1'], 'cannot read README.md as an image'),
  (['--prefix-from-sample', '--prefix-groups=4'], '--prefix-groups must be in 1..3'),
  (['--prefix-from-sample', '--layout-from=README.md', '--prefix-groups=1'],
   '--layout-from and --prefix-from-sample both set the prefix'),
  (['--num-tokens=17'], '--num-tokens must be in 1..16'),
  (['--decoder-steps=5'], '--decoder-steps must be in 1..4'),
  (['--preset=disa'], '--preset does not apply to D-AR'),
  (['--config.sampling.cfg=0.5,3'], 'needs every scale > 1'),
  (['--tokenizer-checkpoint=/no/tok'], 'tokenizer_checkpoint /no/tok does not exist'),
  (['--draft=/no/draft'], '--draft /no/draft does not exist'),
  (['--draft=random:huge'], '--draft=random:huge: unknown size'),
  (['--draft=random:toy', '--previews'], 'speculative decoding (--draft) generates every id'),
  (['--draft=random:toy', '--speculate-from=16'], '--speculate-from must be in 1..15'),
])
def test_sample_bad_input_one_line_error(tmp_path, args, message):
  out = tmp_path / 'out'
  r = run_cli('cli.sample', TINY, *args, f'--out={out}')
  assert r.returncode == 2, r.stderr
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], r.stderr
  assert not out.exists() and not (tmp_path / 'out.partial').exists()


def test_dar_flag_with_a_mar_config_is_refused(tmp_path):
  r = run_cli('cli.sample', f'--config={REPO}/configs/mar_base.py:tiny', '--previews',
              f'--out={tmp_path / "o"}')
  assert r.returncode == 2 and 'error: --previews is a flag of the dar system' in r.stderr
  assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('kind,args,message', [
  ('dar', ['--variant=large'], '--variant=large is a MAR option'),
  ('dar-foo', [], 'converting dar-foo checkpoints is not available'),
])
def test_convert_bad_input(tmp_path, kind, args, message):
  src = tmp_path / 'x.pt'
  import torch

  torch.save({'model': {'tok_embeddings.weight': torch.zeros(4, 4)}}, src)
  r = run_cli('convert.cli', kind, f'--torch-checkpoint={src}', f'--out={tmp_path / "o"}', *args,
              cache=False)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert not (tmp_path / 'o').exists()
