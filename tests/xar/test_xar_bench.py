"""The xAR benchmark command on the tiny architecture: both schedules, JAX vs PyTorch agree,
FLOP prediction present, compile count bounded."""

import pytest

from disa_jax.systems.xar import bench
from disa_jax.systems.xar.config import TINY


@pytest.mark.slow
def test_bench_runs_tiny():
  res = bench.run('B', 2, arch=TINY, steps_scale=0.1)
  assert set(res['runs']) == {'baseline', 'disa'}
  assert res['runs']['baseline']['steps'] == [4] * 4
  assert res['runs']['disa']['steps'] == [5, 4, 3, 3]
  for r in res['runs'].values():
    assert r['max_rel_diff_jax_vs_torch'] < 1e-4     # default matmul precision
    assert r['jax_s_per_image'] > 0 and r['torch_s_per_image'] > 0
  assert res['speedup_paper_readme'] == 1.6
  assert res['compile_count'] <= 8
  with pytest.raises(SystemExit):
    bench.main(['--help'])
