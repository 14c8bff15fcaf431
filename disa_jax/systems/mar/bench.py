"""MAR's `disa-bench`: baseline(s) and DiSA side by side, in one process, on one model and batch.

  disa-bench --config=configs/mar/base.py --batch-size=4 --json
  disa-bench --config=configs/mar/base.py:cpu --runs=mar64=mar:64:100,disa64=disa:64:50:5 \\
      --torch --phases --dtypes=float32,bfloat16

`disa_bench(config, *, batch_size, seed, runs, ...)` is MAR's entry of the one bench seam
(`systems/mar/commands.bench_command` -> `disa_jax.cli.bench_run.run_bench`); each run is
`label=preset:num_iter:upper[:lower[:strategy]]` (`schedules.RunSpec`), the first is the
baseline for speedups. The timed work is `disa_jax.benchmark.run_benchmark` (compile first,
then repeats; phases, the calibrated FLOP model, the PyTorch reference `reference.mar`);
`--dtypes` repeats everything per compute dtype and reports bfloat16's error against float32.
"""

from __future__ import annotations

import json

from disa_jax.errors import UserError

DEFAULT_RUNS = 'mar256=mar:256:100,mar64=mar:64:100,disa64=disa:64:50:5:linear'


def parse_specs(runs: str | None) -> list:
  """`--runs` text -> [RunSpec] (UserError for a bad or empty list)."""
  from disa_jax.schedules import RunSpec

  text = DEFAULT_RUNS if runs is None else runs
  try:
    specs = [RunSpec.parse(t) for t in text.split(',') if t]
  except ValueError as e:
    raise UserError(str(e)) from None
  if not specs:
    raise UserError('--runs is empty')
  return specs


def parse_dtypes(text: str | None) -> list[str] | None:
  dtypes = [d for d in (text or '').split(',') if d] or None
  for d in dtypes or []:
    if d not in ('float32', 'bfloat16'):
      raise UserError(f'--dtypes entries must be float32 or bfloat16, got {d!r}')
  return dtypes


def benchmark(config, specs, *, batch_size: int, dtypes=None, repeats=1, phases=False,
              calibrate=False, with_torch=False, seed=0, cfg=None, cfg_schedule=None,
              torch_threads=0, quality=None, log=print) -> dict:
  """Runs `specs` (list of `RunSpec`) for each compute dtype; returns the result dict."""
  from disa_jax import benchmark as bm
  from disa_jax.engine import runner

  cfg = config.sampling.cfg if cfg is None else cfg
  cfg_schedule = cfg_schedule or config.sampling.cfg_schedule
  for s in specs:
    s.step_plan()                                              # validate before loading
  model, source = runner.build_model(config, seed=seed)
  decoder = runner.build_decoder(config, model)
  metric = None
  if quality:
    from disa_jax.eval.quality import get_quality_metric

    metric = get_quality_metric(quality)
  mesh = runner.make_mesh(config)
  runner.check_batch_size(batch_size, mesh)
  if config.runtime.get('background_compile'):   # timed sampling: nothing compiling behind it
    config = config.copy_and_resolve_references()
    config.runtime.background_compile = False
  dtypes = dtypes or [model.config.dtype]
  out = {'config': config.get('name', ''), 'results': []}
  models = {}
  for dt in dtypes:
    models[dt] = bm.with_dtype(model, dt)
    log(f'=== dtype {dt}')
    res = bm.run_benchmark(
      models[dt], source, specs, sampler_factory=lambda m: runner.make_sampler(m, config, mesh),
      batch_size=batch_size, cfg=cfg, cfg_schedule=cfg_schedule,
      temperature=config.sampling.temperature, repeats=repeats, phases=phases, calibrate=calibrate,
      decoder=decoder,
      with_torch=with_torch and dt == 'float32', torch_threads=torch_threads, quality=metric,
      seed=seed, log=log)
    res['config'] = out['config']
    out['results'].append(res)
  if len(dtypes) > 1:
    ref = dtypes[0]
    out['precision'] = {dt: bm.precision_report(models[ref], models[dt], seed=seed)
                        for dt in dtypes[1:]}
    for dt in dtypes[1:]:
      base = {r['label']: r for r in out['results'][0]['runs']}
      res = out['results'][dtypes.index(dt)]
      out['precision'][dt]['speedup_over_' + ref] = {
        r['label']: round(base[r['label']]['wall_s'] / r['wall_s'], 4) for r in res['runs']}
    out['dtypes'] = list(dtypes)
    return out
  return out['results'][0]          # single dtype: the flat layout (runs at top level)


def disa_bench(config, *, batch_size: int, seed: int = 0, runs: str | None = None,
               repeats: int = 1, phases: bool = False, calibrate: bool = False,
               with_torch: bool = False, torch_threads: int = 0, dtypes: str | None = None,
               quality: str | None = None, cfg: float | None = None,
               cfg_schedule: str | None = None, log=print) -> dict:
  """disa-bench's MAR comparison (`runs`, `dtypes` as given on the command line)."""
  return benchmark(config, parse_specs(runs), batch_size=batch_size, dtypes=parse_dtypes(dtypes),
                   repeats=repeats, phases=phases, calibrate=calibrate, with_torch=with_torch,
                   seed=seed, cfg=cfg, cfg_schedule=cfg_schedule, torch_threads=torch_threads,
                   quality=quality, log=log)


def format_table(result: dict) -> str:
  """One table per dtype (`disa_jax.benchmark.format_table`), then the precision report."""
  from disa_jax.benchmark import format_table as run_table

  parts = [run_table(res) for res in result.get('results', [result])]
  if 'precision' in result:
    parts.append('precision vs ' + result.get('dtypes', ['float32'])[0] + ': '
                 + json.dumps(result['precision']))
  return '\n'.join(parts)
