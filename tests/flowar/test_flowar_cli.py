"""FlowAR through the shared commands, end to end: disa-convert flowar -> disa-sample
--checkpoint, disa-bench (baseline vs DiSA), and bad input (one `error:` line, nothing
written)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CACHE, REPO

from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import flowar_config

TINY = f'--config={REPO}/configs/flowar/s.py:tiny'


def run_cli(tool, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             DISA_TEST_XLA_CACHE=CACHE, PYTHONPATH=str(REPO))
  extra = [f'--config.runtime.compilation_cache={CACHE}'] if tool != 'convert' else []
  module = 'disa_jax.convert.cli' if tool == 'convert' else f'disa_jax.cli.{tool}'
  return subprocess.run([sys.executable, '-m', module, *args, *extra],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def one_error_line(stderr: str) -> str:
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr
  return lines[0]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A tiny official-format FlowAR-S state dict (.pth) converted by `disa-convert flowar`."""
  import torch
  from flowar_testlib import torch_model

  d = tmp_path_factory.mktemp('flowar_cli')
  pth = d / 'FlowAR-tiny.pth'
  torch.save({'model_ema': torch_model('S', seed=5).state_dict(), 'epoch': 3}, pth)
  r = run_cli('convert', 'flowar', f'--torch-checkpoint={pth}', f'--out={d / "ckpt"}')
  assert r.returncode == 0, r.stderr
  assert 'wrote' in r.stdout
  return d


def test_convert_then_sample(converted):
  out = converted / 'samples'
  r = run_cli('sample', TINY, f'--checkpoint={converted / "ckpt"}', '--num-images=3',
              '--batch-size=2', '--classes=4,9', '--noprogress', f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert 'checkpoint' in r.stdout
  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (3, 256, 16) and np.isfinite(tokens).all()
  assert tokens.std() > 0.1
  assert list(np.load(out / 'labels.npy')) == [4, 9, 4]
  m = json.loads((out / 'metrics.json').read_text())
  assert m['steps_requested'] == [6, 5, 4, 3, 2] and m['steps_actual'] == [6, 4, 4, 2, 2]
  assert m['num_iter'] == 5 and m['compilations']['total'] == 10    # 5 scales + 5 noise draws
  # The same images from the library (image i keyed by fold_in(key(seed), i)).
  import jax

  from disa_jax.systems.base import get_system
  config = flowar_config('S', 'tiny')
  with config.unlocked():
    config.checkpoint = str(converted / 'ckpt')
  system = get_system('flowar')
  model, _ = system.build_model(config)
  sampler = system.make_sampler(model, config, None)
  again = sampler.generate(np.array([9, 4]), jax.random.key(0),
                           steps=system.stage_plan(config.sampling).steps,
                           image_ids=np.array([1, 2]))
  np.testing.assert_allclose(np.asarray(again), tokens[1:], rtol=0, atol=1e-4)


def test_convert_bad_file_writes_nothing(tmp_path):
  bad = tmp_path / 'FlowAR-S.pth'
  bad.write_bytes(b'not a checkpoint')
  r = run_cli('convert', 'flowar', f'--torch-checkpoint={bad}', f'--out={tmp_path / "o"}')
  assert r.returncode == 2
  one_error_line(r.stderr)
  assert not (tmp_path / 'o').exists()


def test_sample_bad_guidance_cli(tmp_path):
  out = tmp_path / 'o'
  r = run_cli('sample', TINY, '--config.sampling.guidance=1.5', f'--out={out}')
  assert r.returncode == 2
  assert 'guidance' in one_error_line(r.stderr)
  assert not out.exists() and not (tmp_path / 'o.partial').exists()


@pytest.mark.parametrize('field,value,word', [
  ('temperature', 0.5, 'temperature'),
  ('max_timestep', 900, 'clamp'),
  ('num_iter', 64, 'one AR stage per scale'),
  ('cfg_schedule', 'constant', 'linearly'),
  ('steps', '9,9,9', 'one per AR step'),
  ('lower_steps', 1, 'at least 2'),
  ('baseline_cfg', float('inf'), 'baseline_cfg'),
])
def test_sample_bad_fields_write_nothing(tmp_path, field, value, word):
  from disa_jax.cli.sample import sample

  config = flowar_config('S', 'tiny')
  with config.unlocked():
    config.sampling[field] = value
  out = tmp_path / 'o'
  with pytest.raises(UserError, match=word) as e:
    sample(config, str(out), show_progress=False)
  assert '\n' not in str(e.value)
  assert not out.exists() and not (tmp_path / 'o.partial').exists()


@pytest.mark.slow
def test_bench_baseline_vs_disa(tmp_path):
  js = tmp_path / 'bench.json'
  r = run_cli('bench', TINY, '--batch-size=2', '--phases', f'--json-out={js}')
  assert r.returncode == 0, r.stderr
  assert 'baseline' in r.stdout and 'disa' in r.stdout
  res = json.loads(js.read_text())
  base, disa = res['runs']
  assert base['steps_requested'] == [6] * 5 and disa['steps_requested'] == [6, 5, 4, 3, 2]
  assert base['compilations'] == 5 and disa['compilations'] == 0    # traced step counts
  assert disa['flop_speedup'] > 1.0 and base['flop_speedup'] == 1.0
  assert base['phases']['trunk_s'] > 0 and base['phases']['head_s'] > 0


def test_bench_bad_runs(tmp_path):
  r = run_cli('bench', TINY, '--runs=a=fast:3')
  assert r.returncode == 2
  assert 'bad FlowAR run' in one_error_line(r.stderr)
  r = run_cli('bench', TINY, '--torch')
  assert r.returncode == 2
  assert '--torch is not available for flowar' in one_error_line(r.stderr)


@pytest.mark.slow
def test_gpu_suite_dry_run_flowar(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  r = subprocess.run([sys.executable, str(REPO / 'bench' / 'gpu_suite.py'), '--dry-run',
                      f'--out={tmp_path}', '--only=FlowAR-S'], capture_output=True, text=True,
                     cwd=REPO, env=env, timeout=900)
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())
  (job,) = report['jobs']
  assert job['status'] == 'ok', job
  assert '--config=configs/flowar/s.py:tiny' in job['command'] and '--dtypes' not in job['command']
  base, disa = report['rows']
  assert (base['run'], disa['run']) == ('baseline', 'disa')
  assert base['speedup'] == 1.0 and disa['flop_speedup'] > 1.0 and disa['K'] == 5
  assert (tmp_path / 'gpu_suite.md').read_text().count('| FlowAR-S |') == 2


def test_gpu_suite_flowar_jobs():
  sys.path.insert(0, str(REPO / 'bench'))
  import gpu_suite

  jobs = {j.name: j for j in gpu_suite.JOBS}
  assert {'FlowAR-S', 'FlowAR-L', 'FlowAR-H'} <= set(jobs)
  argv = gpu_suite.command(jobs['FlowAR-H'], REPO / 'x.json', dry_run=False)
  assert '--config=configs/flowar/h.py' in argv and '--batch_size=256' in argv
  assert not any(a.startswith(('--runs', '--dtypes', '--torch')) for a in argv)
  mar = gpu_suite.command(jobs['MAR-B'], REPO / 'x.json', dry_run=False)
  assert any(a.startswith('--runs=') for a in mar) and '--torch' in mar
