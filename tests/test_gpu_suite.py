"""bench/gpu_suite.py: the one-call GPU suite, checked on the CPU in dry-run mode."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

SUITE = [sys.executable, str(REPO / 'bench' / 'gpu_suite.py')]


def _run(*args, cwd=REPO):
  return subprocess.run([*SUITE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_dry_run_writes_json_and_table(tmp_path):
  r = _run('--dry-run', f'--out={tmp_path}', '--only=MAR-B')
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())
  (job,) = report['jobs']
  assert job['status'] == 'ok' and '--torch' in job['command']
  runs = [row['run'] for row in report['rows']]
  assert runs == ['base', 'disa']
  base, disa = report['rows']
  assert base['speedup'] == 1.0 and disa['flop_speedup'] > 1.0   # DiSA does less head work
  assert all(row['images_per_s'] > 0 and row['jax_over_torch'] > 0 for row in report['rows'])
  table = (tmp_path / 'gpu_suite.md').read_text()
  assert table.count('| MAR-B |') == 2 and 'JAX / PyTorch' in table
  assert not list(tmp_path.glob('.*.tmp'))                       # atomic writes left nothing


def test_refuses_full_run_without_gpu_and_unknown_jobs(tmp_path):
  r = _run(f'--out={tmp_path}')
  assert r.returncode == 2 and r.stderr.startswith('error: no GPU found')
  assert not (tmp_path / 'gpu_suite.json').exists()
  r = _run('--dry-run', f'--out={tmp_path}', '--only=nope')
  assert r.returncode == 2 and '--only matched no job' in r.stderr
  r = _run('--dry-run', '--budget-s=nan')
  assert r.returncode == 2 and r.stderr.count('\n') == 1


@pytest.mark.slow
def test_dry_run_dar_job(tmp_path):
  r = _run('--dry-run', f'--out={tmp_path}', '--only=D-AR-L')
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())
  (job,) = report['jobs']
  assert job['status'] == 'ok', job
  assert [row['run'] for row in report['rows']] == ['full', 'stop=8', 'grid=2']
  assert all(row['images_per_s'] > 0 for row in report['rows'])
  assert (tmp_path / 'gpu_suite.md').read_text().count('| D-AR-L |') == 3


@pytest.mark.slow
def test_dry_run_xar_job(tmp_path):
  """xAR's job: disa-bench on the tiny config through xAR's own comparison (baseline vs DiSA,
  FLOP prediction, seconds per cell)."""
  r = _run('--dry-run', f'--out={tmp_path}', '--only=xAR-B')
  assert r.returncode == 0, r.stderr
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())
  (job,) = report['jobs']
  assert job['status'] == 'ok', job
  base, disa = report['rows']
  assert (base['run'], base['steps'], disa['run'], disa['steps']) == (
    'baseline', '3/3/3/3', 'disa', '4/3/3/3')
  assert base['speedup'] == 1.0 and 0 < disa['flop_speedup'] < 1.0    # DiSA runs more here
  assert all(row['images_per_s'] > 0 and len(row['phases']['cell_s']) == 4
             for row in report['rows'])
  assert (tmp_path / 'gpu_suite.md').read_text().count('| xAR-B |') == 2
