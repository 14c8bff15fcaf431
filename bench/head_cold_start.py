"""Cold start of MAR DiSA sampling (issue 20): compile time, compile counts, sampling time.

  PYTHONPATH=. python bench/head_cold_start.py --variant=base-cpu --modes=exact,traced
  PYTHONPATH=. python bench/head_cold_start.py --variant=base --batch=1 --modes=exact,traced \
      --cache=/tmp/xla_cache

Each (mode, threads) is measured in a fresh subprocess (a cold process: nothing compiled in
memory; no persistent cache unless --cache): `Sampler.compile` of the plan (compile_s, split
into lower = trace + StableHLO, xla = XLA compile or cache load, warmup = placeholder runs
with --warmup), then --repeats `generate` calls (first_batch_s = compile + the first one;
sample_s = the fastest, the long-run rate; --repeats=0 measures the start only); with --cache
a second subprocess measures the warm start from the persistent cache, which then also keeps
the traces (`<cache>/traces`, `engine/aot.py`; --no_traces: XLA cache only). Random weights
(compile and sampling time do not depend on the values). Prints one JSON object per line.
Modes: exact (a head executable per (steps, rows) bucket), traced (one per rows bucket, the
step count a traced `fori_loop` bound); threads: buckets compiled in parallel threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(variant, mode, threads, batch, cache, repeats, warmup, traces, background=False):
  import jax

  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  from disa_jax.config import mar_config
  from disa_jax.systems.mar import SYSTEM
  from disa_jax.systems.mar.sampling import Sampler

  name, _, kind = variant.partition('-')
  config = mar_config(name, cpu=kind == 'cpu')
  model, _ = SYSTEM.build_model(config, seed=0)
  plan = SYSTEM.stage_plan(config.sampling)
  sampler = Sampler(model, head_steps=mode, compile_threads=threads, warmup=warmup,
                    trace_cache=os.path.join(cache, 'traces') if cache and traces else None,
                    background_compile=background)
  labels = list(range(batch))
  kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=config.sampling.cfg,
            temperature=config.sampling.temperature)
  t0 = time.perf_counter()
  if background:   # until the first AR step is done: the start, then stop sampling
    class FirstStep(Exception):
      pass

    def first_step(_):
      raise FirstStep

    try:
      sampler.generate(labels, jax.random.key(0), progress=first_step, **kw)
    except FirstStep:
      pass
    first_step_s = time.perf_counter() - t0
    return {'variant': variant, 'mode': mode, 'threads': threads, 'batch': batch,
            'cache': bool(cache), 'traces': bool(cache and traces), 'background': True,
            'first_step_s': round(first_step_s, 2),
            'start_s': round(sampler.phase_s['lower'] + sampler.phase_s['wait'], 2),
            'trace_loads': sum(sampler.trace_loads.values()),
            'split': {k: round(v, 2) for k, v in sampler.phase_s.items()}}
  compile_s = sampler.compile(sampler.plan(batch, steps=plan.steps,
                                           max_timestep=plan.max_timestep,
                                           cfg=config.sampling.cfg))
  rec = {'variant': variant, 'mode': mode, 'threads': threads, 'batch': batch,
         'cache': bool(cache), 'traces': bool(cache and traces), 'warmup': warmup,
         'compile_s': round(compile_s, 2), 'trace_loads': sum(sampler.trace_loads.values()),
         'split': {k: round(v, 2) for k, v in sampler.phase_s.items()},
         'compiles': dict(sampler.trace_counts)}
  if repeats:   # the first batch (compiled above) and the long-run rate
    first = sampler.generate(labels, jax.random.key(0), **kw)
    rec['first_batch_s'] = round(time.perf_counter() - t0, 2)
    sample_s = [sampler.last_stats.wall_s]
    for _ in range(repeats - 1):
      sampler.generate(labels, jax.random.key(0), **kw)
      sample_s.append(sampler.last_stats.wall_s)
    rec.update(first_sample_s=round(sample_s[0], 3), sample_s=round(min(sample_s), 3),
               head_buckets=sampler.last_stats.plan.report()['head_buckets'],
               checksum=float(abs(first).sum()))
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='base-cpu', help='base | base-cpu | large | ...')
  p.add_argument('--modes', default='exact,traced')
  p.add_argument('--threads', default='1', help='comma list of compile thread counts')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--repeats', type=int, default=2,
                 help='generate calls after compiling (0: compile only; the first is the first '
                 'batch, the fastest of the rest the sampling rate)')
  p.add_argument('--warmup', action='store_true', help='Sampler(warmup=True)')
  p.add_argument('--background', action='store_true',
                 help='Sampler(background_compile=True): measure the start (lowering + waits '
                 'until the first AR step is done) and stop there')
  p.add_argument('--no_traces', action='store_true',
                 help='with --cache: keep no traces (XLA cache only; every start traces)')
  p.add_argument('--cache', default='', help='persistent cache dir (cleared first): warm time')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    print(json.dumps(measure(a.variant, a.modes, int(a.threads), a.batch, a.cache, a.repeats,
                             a.warmup, not a.no_traces, a.background)))
    return
  for mode in a.modes.split(','):
    for threads in a.threads.split(','):
      cache = os.path.join(a.cache, f'{mode}-{threads}') if a.cache else ''
      if cache:
        subprocess.run(['rm', '-rf', cache], check=True)
      runs = ['cold', 'warm'] if cache else ['cold']
      for run in runs:
        cmd = [sys.executable, __file__, '--child', f'--variant={a.variant}', f'--modes={mode}',
               f'--threads={threads}', f'--batch={a.batch}', f'--repeats={a.repeats}',
               f'--cache={cache}'] + ['--warmup'] * a.warmup + ['--no_traces'] * a.no_traces \
          + ['--background'] * a.background
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
          sys.exit(out.stderr[-3000:])
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec['run'] = run
        print(json.dumps(rec), flush=True)


if __name__ == '__main__':
  main()
