"""XLA's own cost analysis of the LazyMAR executables next to the uncached backbone's.

  PYTHONPATH=. python bench/lazy_xla_cost.py --model=mar_base --num_iter=64 --batch=4
  PYTHONPATH=. python bench/lazy_xla_cost.py ... --time_step=59 --repeats=4

Compiles (no sampling) every uncached backbone bucket and every refresh / lazy bucket of the
DiSA linear 50 -> 5 plan (random weights, CFG 2.9) and prints, per executable, the FLOPs and
bytes accessed that XLA counts (`Compiled.cost_analysis()`), so measured per-step times
(`bench/lazy_cache.py --split`) can be read against counted work: time that follows neither
count is overhead outside the arithmetic (allocation, dispatch, threading of small GEMMs).
--time_step=S also times, in isolation (each call synchronised, --repeats times, alternating),
the uncached backbone and the cached executable (refresh or lazy) of AR step S on the same
inputs: what one call costs outside the sampling loop. --profile=DIR also records one call of
each under `jax.profiler` and prints where its time goes by op kind (XLA:CPU reports each
thunk: GEMM fusions, copies, scatters, sorts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disa_jax.schedules import resolve_steps  # noqa: E402
from disa_jax.systems.mar.lazy import LazyBackbone, parse_cache  # noqa: E402
from disa_jax.systems.mar.sampling import Sampler  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='mar_base')
  p.add_argument('--num_iter', type=int, default=64)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--cache', default='lazymar')
  p.add_argument('--json', default='')
  p.add_argument('--time_step', type=int, default=-1, help='AR step to time in isolation')
  p.add_argument('--repeats', type=int, default=4)
  p.add_argument('--profile', default='', help='with --time_step: trace dir; prints top ops')
  p.add_argument('--top', type=int, default=15, help='op kinds printed per profiled call')
  args = p.parse_args(argv)
  from flax import nnx

  from disa_jax.systems.mar.model import MAR, MARConfig
  from disa_jax.systems.mar.variants import MAR_VARIANTS, PAPER_CFG

  model = MAR(MARConfig(**MAR_VARIANTS[args.model]), rngs=nnx.Rngs(0))
  sp = Sampler(model, background_compile=False)
  sched = resolve_steps(num_iter=args.num_iter, preset='disa', upper=50, lower=5)
  plan = sp.plan(args.batch, steps=sched.steps, max_timestep=sched.max_timestep,
                 cfg=PAPER_CFG[args.model])
  b, seq, ch = args.batch, sp.config.seq_len, sp.config.token_embed_dim
  labels = sp._batch(np.zeros((b,), np.int32))
  keys = sp._batch(jax.random.split(jax.random.key(0), b))
  orders, class_vec = sp._run('init', (sp.state, labels, keys),
                              dict(graphdef=sp.graphdef, seq_len=seq))
  tokens = sp._batch(np.zeros((b, seq, ch), np.float32))
  for job in sp._compile_jobs(plan, False, None, None, tokens, orders, class_vec, keys):
    if job[0] == 'backbone':
      sp._executable(*job)
  lazy = LazyBackbone(sp, plan, parse_cache(args.cache))
  lazy.compile(tokens, orders, class_vec)
  rows = []
  for key, exe in sp._executables.items():
    name, static = key[0], dict(key[2])
    if name not in ('backbone', 'lazy_refresh', 'lazy_step'):
      continue
    cost = getattr(exe, 'compiled', exe).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    rows.append({'function': name,
                 **{k: static[k] for k in ('visible_pad', 'new_pad', 'keep') if k in static},
                 'gflop': round(cost.get('flops', 0.0) / 1e9, 1),
                 'gb_accessed': round(cost.get('bytes accessed', 0.0) / 1e9, 2)})
  rows.sort(key=lambda r: (r['function'], r.get('visible_pad', 0), -r.get('keep', 0)))
  print(f"{args.model}, batch {b}, {args.num_iter} AR steps, cfg {PAPER_CFG[args.model]}, "
        f"cache {args.cache}: XLA-counted cost per executable call")
  for r in rows:
    shape = ', '.join(f'{k} {r[k]}' for k in ('visible_pad', 'new_pad', 'keep') if k in r)
    print(f"{r['function']:<14}{shape:<26}{r['gflop']:>9.1f} GFLOP{r['gb_accessed']:>8.2f} GB")
  if args.json:
    with open(args.json + '.partial', 'w') as f:
      json.dump(rows, f, indent=1)
    os.replace(args.json + '.partial', args.json)
  if args.time_step >= 0:
    time_step(sp, plan, lazy, args.time_step, args.repeats, tokens, orders, class_vec,
              profile=args.profile, top=args.top)
  return rows


def time_step(sp, plan, lazy, index, repeats, tokens, orders, class_vec, profile='', top=15):
  """Synchronised wall seconds of AR step `index`'s uncached backbone and cached executable;
  with `profile`, one traced call of each and its most expensive ops."""
  import time

  import jax.numpy as jnp

  tokens = jax.random.normal(jax.random.key(1), tokens.shape, tokens.dtype)
  s, st = plan.steps[index], lazy.steps[index]
  plain = ('backbone', (sp.state, tokens, orders, class_vec, jnp.int32(s.m_cur),
                        jnp.int32(s.n_pred)),
           dict(graphdef=sp.graphdef, visible_pad=s.visible_pad, n_query=plan.n_query,
                use_cfg=plan.use_cfg))
  if not st.refresh:   # a lazy step needs a filled cache: the refresh of step 0's shapes
    lazy.cache = sp._run(*lazy._args(lazy.steps[0], tokens, orders, class_vec))[3]
  times = {'backbone': [], 'refresh' if st.refresh else 'lazy': []}

  def job_for(name):   # a lazy step donates its cache: each call gets a fresh copy
    if name == 'lazy':
      return lazy._args(st, tokens, orders, class_vec,
                        cache=jax.block_until_ready(jax.tree.map(jnp.copy, lazy.cache)))
    return plain if name == 'backbone' else lazy._args(st, tokens, orders, class_vec)

  for _ in range(repeats):
    for name in times:
      job = job_for(name)
      t0 = time.perf_counter()
      jax.block_until_ready(sp._run(*job))
      times[name].append(round(time.perf_counter() - t0, 2))
  print(f'AR step {index} in isolation (s per call, {repeats} alternating calls):',
        ', '.join(f'{k} {v}' for k, v in times.items()))
  if not profile:
    return
  for name in times:
    job = job_for(name)
    out_dir = os.path.join(profile, name)
    jax.profiler.start_trace(out_dir)
    jax.block_until_ready(sp._run(*job))
    jax.profiler.stop_trace()
    ops = op_times(out_dir)
    print(f'{name}: {sum(ms for ms, _ in ops.values()):.1f} ms in XLA ops; by kind (ms, count):')
    for op, (ms, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
      print(f'  {ms:9.1f} {n:5d}  {op}')


def op_times(trace_dir: str) -> dict:
  """{op kind: (total ms, count)} of the XLA ops in the newest trace under trace_dir (kind =
  the op name without its '.N' suffix: ynn_fusion = the GEMM fusions, wrapped_scatter, copy,
  ...; host-side wrapper events left out)."""
  import collections
  import glob
  import gzip
  import re

  path = max(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
             key=os.path.getmtime)
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  total, count = collections.Counter(), collections.Counter()
  skip = ('Pjit', 'PjRt', 'Execute', 'Allocate', 'Handle', 'Parse', 'Python', '$', 'end: ',
          'Await', 'Create', 'ThunkExecutor')
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and not any(k in name for k in skip):
      kind = re.sub(r'\.\d+$', '', name)
      total[kind] += e.get('dur', 0) / 1e3
      count[kind] += 1
  return {k: (round(v, 1), count[k]) for k, v in total.items()}


if __name__ == '__main__':
  main()
