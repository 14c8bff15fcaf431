"""FlowAR's command bodies (`SYSTEM.commands`, see `disa_jax.systems.base.find_command`).

Sampling and evaluation use the shared bodies; `bench_command` runs this system's own
comparison (`systems/flowar/bench.disa_bench`) through the shared adapter
`disa_jax.cli.bench_run.run_bench` (flags -> keywords, JSON / table report).
"""

from __future__ import annotations


def bench_command(config):
  from disa_jax.cli.bench_run import run_bench
  from disa_jax.systems.flowar import bench

  return run_bench(config, bench.disa_bench, bench.format_table)
