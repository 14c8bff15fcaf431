"""The FlowAR benchmark command on a tiny architecture: both schedules, JAX vs PyTorch agree,
FLOP prediction present, compile count bounded."""

import pytest

from disa_jax.systems.flowar import bench
from disa_jax.systems.flowar.config import TINY


@pytest.mark.slow
def test_bench_runs_tiny(capsys):
  res = bench.run('S', 2, arch=TINY['S'])
  assert set(res['runs']) == {'baseline', 'disa'}
  assert res['runs']['disa']['steps'] == [25, 22, 20, 17, 15]
  for r in res['runs'].values():
    assert r['max_rel_diff_jax_vs_torch'] < 1e-4     # default matmul precision
    assert r['jax_s_per_image'] > 0 and r['torch_s_per_image'] > 0
  assert res['speedup_flop_model'] > 1.0
  assert res['speedup_paper_readme'] == 1.5
  assert res['compile_count'] <= 10
  with pytest.raises(SystemExit):
    bench.main(['--help'])
