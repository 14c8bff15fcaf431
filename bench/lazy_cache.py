"""LazyMAR caching x DiSA, side by side in one process: speed (and quality on the digits model).

  # speed at MAR-B shapes (random weights), batch 4, CFG 2.9, 16 AR steps, CPU:
  nice python bench/lazy_cache.py --model=mar_base --num_iter=16 --batch=4 \
      --runs=disa,disa+cache --json=outputs/lazy_mar_base.json
  # quality on the bundled digits model (accuracy / Frechet distance as disa-demo):
  nice python bench/lazy_cache.py --model=digits --num_images=200 --seeds=0,1 \
      --runs=mar,mar+cache,disa,disa+cache

Runs: `mar` = the original schedule (--mar_steps at every AR step, no clamp), `disa` = DiSA
linear --disa_upper -> --disa_lower with the 950 clamp; `+cache` adds `--cache` (default
lazymar: backbone and head caches), `+bbcache` the same with the head cache off (head=0). Every run of one invocation uses the same weights, labels, seeds, generation orders
and noise; compilation happens before the timed part and is reported separately; each run is
timed --repeats times (the minimum is reported); --split adds a synchronised pass that times
the backbone and the head separately. Prints a table and (with --json) writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disa_jax.diffusion.gaussian import DISA_MAX_TIMESTEP  # noqa: E402
from disa_jax.schedules import resolve_steps  # noqa: E402
from disa_jax.systems.mar.sampling import Sampler  # noqa: E402


def build(args):
  if args.model == 'digits':
    from disa_jax.checkpoint import load_mar
    from disa_jax.systems.mar.variants import digits_config

    config = digits_config()
    model = load_mar(config.checkpoint, overrides={'attn_splits': 0})
    return model, config.sampling.cfg, config.tokenizer.scale
  from flax import nnx

  from disa_jax.systems.mar.model import MAR, MARConfig
  from disa_jax.systems.mar.variants import MAR_VARIANTS, PAPER_CFG

  model = MAR(MARConfig(**MAR_VARIANTS[args.model]), rngs=nnx.Rngs(0))
  return model, PAPER_CFG[args.model], None


def schedules(args):
  return {
    'mar': resolve_steps(num_iter=args.num_iter, preset='mar', upper=args.mar_steps,
                         lower=args.mar_steps),
    'disa': resolve_steps(num_iter=args.num_iter, preset='disa', strategy='linear',
                          upper=args.disa_upper, lower=args.disa_lower,
                          max_timestep=DISA_MAX_TIMESTEP),
  }


CACHE_RUNS = {'+cache': '', '+bbcache': 'head=0'}   # run suffix -> items added to --cache


def split_run(run: str, cache: str) -> tuple[str, str]:
  """(schedule name, cache spec) of a run name such as 'disa+bbcache'."""
  for suffix, extra in CACHE_RUNS.items():
    if run.endswith(suffix):
      spec = cache if not extra else cache + (',' if ':' in cache else ':') + extra
      return run.removesuffix(suffix), spec
  return run, 'none'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='mar_base', help='mar_base | mar_large | digits')
  p.add_argument('--num_iter', type=int, default=None, help='AR steps (default: model config)')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--num_images', type=int, default=None, help='default: one batch')
  p.add_argument('--seeds', default='0')
  p.add_argument('--runs', default='disa,disa+cache')
  p.add_argument('--cache', default='lazymar')
  p.add_argument('--mar_steps', type=int, default=100)
  p.add_argument('--disa_upper', type=int, default=50)
  p.add_argument('--disa_lower', type=int, default=5)
  p.add_argument('--cfg', type=float, default=None)
  p.add_argument('--solver', default='ddpm')
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--flops_only', action='store_true',
                 help='print the counted FLOPs of the runs (no sampling, no compile)')
  p.add_argument('--split', action='store_true', help='also time backbone / head separately')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  model, default_cfg, scale = build(args)
  cfg = default_cfg if args.cfg is None else args.cfg
  if args.num_iter is None:
    args.num_iter = 16 if args.model == 'digits' else 64
  num_images = args.num_images or args.batch
  scheds = schedules(args)
  runs = [r for r in args.runs.split(',') if r]
  for r in runs:
    if split_run(r, args.cache)[0] not in scheds:
      p.error(f'unknown run {r!r}; use mar or disa, optionally with +cache or +bbcache')
  if args.flops_only:
    return print_flops(model.config, scheds, runs, args, cfg)
  sampler = Sampler(model, solver=args.solver)
  labels = np.arange(num_images) % model.config.class_num
  seeds = [int(s) for s in args.seeds.split(',')]
  quality = None
  if args.model == 'digits':
    from disa_jax.eval.digits_quality import DigitsQuality
    from disa_jax.tokenizers.image import PixelTokenizer

    quality, tok = DigitsQuality(), PixelTokenizer(model.config, scale=scale)
  result = {'model': args.model, 'backend': jax.default_backend(), 'batch': args.batch,
            'num_images': num_images, 'num_iter': args.num_iter, 'cfg': cfg,
            'solver': args.solver, 'cache': args.cache, 'seeds': seeds,
            'cpu_count': os.cpu_count(), 'load_avg': os.getloadavg()[0], 'runs': {}}
  images = {}
  for r in runs:
    name, cache = split_run(r, args.cache)
    plan = scheds[name]
    kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=cfg, cache=cache)
    row = {'sample_s': 0.0, 'compile_s': 0.0}
    out = {s: [] for s in seeds}
    for seed in seeds:
      for lo in range(0, num_images, args.batch):
        ids = np.arange(lo, min(lo + args.batch, num_images))
        best = None
        for _ in range(args.repeats):
          tokens = sampler.generate(labels[ids], jax.random.key(seed), image_ids=ids, **kw)
          jax.block_until_ready(tokens)
          st = sampler.last_stats
          best = st.wall_s if best is None else min(best, st.wall_s)
          row['compile_s'] += st.compile_s
        row['sample_s'] += best
        out[seed].append(np.asarray(tokens))
    if args.split:   # backbone / head split: one more, synchronised pass
      marks = []     # (AR step, 'b' after its backbone / 'h' after its head, time)

      def on_backbone(s, z, *_, marks=marks):
        jax.block_until_ready(z)
        marks.append((s.index, 'b', time.perf_counter()))

      sampler.generate(labels[:args.batch], jax.random.key(seeds[0]), timed=True,
                       on_backbone=on_backbone,
                       progress=lambda i, marks=marks: marks.append((i, 'h', time.perf_counter())),
                       **kw)
      row['backbone_s'] = sampler.last_stats.backbone_s
      row['head_s'] = sampler.last_stats.head_s
      done = {(i, k): t for i, k, t in marks}
      row['backbone_s_per_step'] = [
        round(done[(i, 'b')] - done[(i - 1, 'h')], 4) for i in range(1, args.num_iter)]
    row['ms_per_image'] = 1000 * row['sample_s'] / (num_images * len(seeds))
    row['compiles'] = sampler.last_stats.compiles
    if sampler.last_stats.cache:
      row['refresh_steps'] = sampler.last_stats.cache['refresh_steps']
      row['kept_rows'] = sampler.last_stats.cache['kept_rows']
    result['runs'][r] = row
    images[r] = out
  if quality is not None:   # scored after all timed sampling
    for r in runs:
      per_seed = []
      for seed in seeds:
        imgs = tok.decode(np.concatenate(images[r][seed]))
        per_seed.append(quality.evaluate(imgs, labels))
      row = result['runs'][r]
      for k in ('accuracy', 'fd'):
        vals = [q[k] for q in per_seed]
        row[k] = float(np.mean(vals))
        row[k + '_per_seed'] = vals
  base = result['runs'][runs[0]]['sample_s']
  for row in result['runs'].values():
    row['speedup_vs_first'] = base / row['sample_s']
  print(format_table(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + '.partial'
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1, default=float)
    os.replace(tmp, args.json)
  return result


def print_flops(model_config, scheds, runs, args, cfg) -> dict:
  """Counted FLOPs per image (G) of each run: backbone, head, total, and the ratio to the
  first run (`lazy.plan_flops`, `flops.plan_flops`)."""
  from disa_jax.systems.mar.lazy import parse_cache, plan_flops
  from disa_jax.systems.mar.plan import make_plan

  out = {}
  for r in runs:
    name, cache = split_run(r, args.cache)
    sch = scheds[name]
    plan = make_plan(model_config, batch_size=args.batch, steps=sch.steps,
                     max_timestep=sch.max_timestep, cfg=cfg,
                     enc_bucket=max(1, model_config.seq_len // 16))
    cached = cache != 'none'
    f = plan_flops(model_config, plan, parse_cache(cache if cached else args.cache),
                   enc_bucket=max(1, model_config.seq_len // 16))
    bb = f['backbone_cached'] if cached else f['backbone_uncached']
    hd = f['head_cached'] if cached else f['head']
    out[r] = {'backbone_gflop': bb / 1e9, 'head_gflop': hd / 1e9,
              'total_gflop': (bb + hd) / 1e9}
  first = out[runs[0]]['total_gflop']
  print(f"counted GFLOP per image, {args.model}, {args.num_iter} AR steps, cfg {cfg}, "
        f"cache {args.cache}")
  print(f"{'run':<14}{'backbone':>10}{'head':>9}{'total':>9}{'speedup':>9}")
  for r, v in out.items():
    print(f"{r:<14}{v['backbone_gflop']:>10.0f}{v['head_gflop']:>9.0f}{v['total_gflop']:>9.0f}"
          f"{first / v['total_gflop']:>8.2f}x")
  return out


def format_table(result) -> str:
  lines = [f"{result['model']} batch {result['batch']} x {result['num_images']} images, "
           f"{result['num_iter']} AR steps, cfg {result['cfg']}, {result['solver']}, "
           f"backend {result['backend']}, seeds {result['seeds']}, "
           f"load avg {result['load_avg']:.1f}"]
  head = f"{'run':<14}{'sample s':>10}{'ms/img':>10}{'speedup':>9}{'backbone s':>12}" \
         f"{'head s':>9}{'acc':>8}{'FD':>9}{'compile s':>11}"
  lines.append(head)
  for name, r in result['runs'].items():
    def f(k, fmt, r=r):
      return format(r[k], fmt) if k in r else '-'
    lines.append(f"{name:<14}{r['sample_s']:>10.2f}{r['ms_per_image']:>10.1f}"
                 f"{r['speedup_vs_first']:>8.2f}x{f('backbone_s', '.2f'):>12}"
                 f"{f('head_s', '.2f'):>9}{f('accuracy', '.3f'):>8}{f('fd', '.2f'):>9}"
                 f"{r['compile_s']:>11.1f}")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
