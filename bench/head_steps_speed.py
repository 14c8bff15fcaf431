"""Sampling speed of the two head compile modes side by side (issue 20): `exact` (one head
executable per (steps, rows) bucket, adaLN modulations precomputed) vs `traced` (one per rows
bucket, the step count a traced loop bound over padded tables, per-step modulations).

  PYTHONPATH=. python bench/head_steps_speed.py --variant=base --batch=4 --num_iter=16 \
      --repeats=2 --cache=/tmp/xla_cache

Random weights, DiSA linear 50 -> 5 with the 950 clamp and the variant's CFG; one process,
runs alternated (exact, traced, exact, traced, ...), each synchronised per phase
(`generate(timed=True)`): backbone and head seconds, fastest of --repeats. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import jax


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='base')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--num_iter', type=int, default=16)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--cache', default='', help='persistent XLA cache (and traces) directory')
  a = p.parse_args(argv)
  if a.cache:
    jax.config.update('jax_compilation_cache_dir', a.cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from disa_jax.config import mar_config
  from disa_jax.diffusion.gaussian import DISA_MAX_TIMESTEP
  from disa_jax.schedules import resolve_steps
  from disa_jax.systems.mar import SYSTEM
  from disa_jax.systems.mar.sampling import Sampler

  config = mar_config(a.variant)
  model, _ = SYSTEM.build_model(config, seed=0)
  plan = resolve_steps(num_iter=a.num_iter, preset='disa', strategy='linear', upper=50, lower=5,
                       max_timestep=DISA_MAX_TIMESTEP)
  kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=config.sampling.cfg,
            temperature=config.sampling.temperature, timed=True)
  traces = os.path.join(a.cache, 'traces') if a.cache else None
  samplers = {m: Sampler(model, head_steps=m, compile_threads=2, trace_cache=traces)
              for m in ('exact', 'traced')}
  labels = list(range(a.batch))
  best = {m: None for m in samplers}
  for s in samplers.values():
    s.compile(s.plan(a.batch, steps=plan.steps, max_timestep=plan.max_timestep,
                     cfg=config.sampling.cfg), block=True)
  outs = {}
  for _ in range(a.repeats):
    for m, s in samplers.items():
      outs[m] = s.generate(labels, jax.random.key(0), **kw)
      st = s.last_stats
      rec = {'wall_s': st.wall_s, 'backbone_s': st.backbone_s, 'head_s': st.head_s}
      if best[m] is None or rec['wall_s'] < best[m]['wall_s']:
        best[m] = rec
  diff = float(abs(outs['exact'] - outs['traced']).max())
  result = {'variant': a.variant, 'batch': a.batch, 'num_iter': a.num_iter,
            'load_avg': os.getloadavg()[0], 'max_token_diff': diff,
            'runs': {m: {k: round(v, 2) for k, v in r.items()} for m, r in best.items()},
            'head_traced_over_exact': round(best['traced']['head_s'] / best['exact']['head_s'], 3),
            'wall_traced_over_exact': round(best['traced']['wall_s'] / best['exact']['wall_s'], 3)}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
