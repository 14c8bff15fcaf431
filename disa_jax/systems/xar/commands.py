"""xAR's command bodies (`SYSTEM.commands`, see `disa_jax.systems.base.find_command`).

Sampling and evaluation use the shared bodies; `bench_command` runs xAR's own comparison
(`systems/xar/bench.disa_bench(config, *, batch_size, seed, log, ...)` with `format_table`)
through the shared adapter `disa_jax.cli.bench_run.run_bench`, once that entry exists.
"""

from __future__ import annotations

from disa_jax.errors import UserError


def bench_command(config):
  from disa_jax.cli.bench_run import run_bench
  from disa_jax.systems.xar import bench

  if not hasattr(bench, 'disa_bench'):
    raise UserError('disa-bench has no xAR comparison yet; run `python -m '
                    'disa_jax.systems.xar.bench --variant B` (random weights, official shapes)')
  return run_bench(config, bench.disa_bench, bench.format_table)
