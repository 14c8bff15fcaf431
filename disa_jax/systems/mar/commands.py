"""MAR's command bodies (`SYSTEM.commands`, see `disa_jax.systems.base.find_command`).

MAR samples, evaluates and trains through the shared bodies (`cli/sample.sample`,
`cli/eval.evaluate`, `train/loop.train` with its `train_step` hook), so it defines only
`bench_command`: its stage-step comparison (`systems/mar/bench.disa_bench`) run through the
shared bench adapter `disa_jax.cli.bench_run.run_bench` like every other system's.
"""

from __future__ import annotations


def bench_command(config):
  from disa_jax.cli.bench_run import run_bench
  from disa_jax.systems.mar import bench

  return run_bench(config, bench.disa_bench, bench.format_table)
