"""Cold start of MAR DiSA sampling (issue 20): compile time, compile counts, sampling time.

  PYTHONPATH=. python bench/head_cold_start.py --variant=base-cpu --modes=exact,traced
  PYTHONPATH=. python bench/head_cold_start.py --variant=base --batch=1 --modes=exact,traced \
      --cache=/tmp/xla_cache

Each (mode, threads) is measured in a fresh subprocess (a cold process: nothing compiled in
memory; no persistent cache unless --cache): first `generate` (compile + sampling of the first
batch) and a second `generate` on the same plan (sampling only, the long-run rate); with
--cache a second subprocess measures the warm start from the persistent cache. Random weights
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


def measure(variant, mode, threads, batch, cache, repeats):
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
  sampler = Sampler(model, head_steps=mode, compile_threads=threads)
  labels = list(range(batch))
  kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=config.sampling.cfg,
            temperature=config.sampling.temperature)
  t0 = time.perf_counter()
  first = sampler.generate(labels, jax.random.key(0), **kw)
  first_batch_s = time.perf_counter() - t0
  stats = sampler.last_stats
  sample_s = []
  for _ in range(repeats):
    sampler.generate(labels, jax.random.key(0), **kw)
    sample_s.append(sampler.last_stats.wall_s)
  return {'variant': variant, 'mode': mode, 'threads': threads, 'batch': batch,
          'cache': bool(cache), 'compile_s': round(stats.compile_s, 2),
          'compiles': stats.compiles, 'first_batch_s': round(first_batch_s, 2),
          'sample_s': round(min(sample_s), 3), 'head_buckets': stats.plan.report()['head_buckets'],
          'checksum': float(abs(first).sum())}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='base-cpu', help='base | base-cpu | large | ...')
  p.add_argument('--modes', default='exact,traced')
  p.add_argument('--threads', default='1', help='comma list of compile thread counts')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--cache', default='', help='persistent cache dir (cleared first): warm time')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    print(json.dumps(measure(a.variant, a.modes, int(a.threads), a.batch, a.cache, a.repeats)))
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
               f'--cache={cache}']
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
          sys.exit(out.stderr[-3000:])
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec['run'] = run
        print(json.dumps(rec), flush=True)


if __name__ == '__main__':
  main()
