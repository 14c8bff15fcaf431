"""Head solvers x step schedules on the bundled digits model: quality vs head evaluations.

  PYTHONPATH=. python bench/solver_frontier.py --num_images=500 --seeds=0 \
      --json=outputs/solver_frontier.json --plot=docs/solver_frontier.png

Every point generates the same images (labels, seed, generation orders) with one head solver
(`ddpm` = the official ancestral sampler, `ddim` with --eta, `dpmpp_2m`) and one per-AR-step
step list: DiSA linear upper -> lower (`disa:U:L`) or the same count at every AR step
(`const:N`), both with DiSA's 950 timestep clamp (the digits model, like every MAR, is poor at
t = 999; `docs/benchmarks.md`). Quality is `eval/digits_quality.py` (classifier accuracy and
Frechet distance); cost is the counted head evaluations per image (token-steps summed over AR
steps, `SamplingPlan.head_token_steps`; a guided step is one evaluation of the doubled batch).
Prints a table, writes --json and a plot of FD against head evaluations (--plot).
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

DEFAULT_SCHEDULES = 'disa:50:5,disa:25:3,disa:12:2,disa:8:2,disa:5:1,const:3,const:5,const:10'


def step_plan(spec: str, num_iter: int):
  kind, *nums = spec.split(':')
  if kind == 'disa' and len(nums) == 2:
    return resolve_steps(num_iter=num_iter, preset='disa', strategy='linear', upper=int(nums[0]),
                         lower=int(nums[1]), max_timestep=DISA_MAX_TIMESTEP)
  if kind == 'const' and len(nums) == 1:
    return resolve_steps(num_iter=num_iter, preset='mar', upper=int(nums[0]),
                         lower=int(nums[0]), max_timestep=DISA_MAX_TIMESTEP)
  raise SystemExit(f'bad schedule {spec!r}; use disa:UPPER:LOWER or const:N')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--solvers', default='ddpm,ddim,dpmpp_2m')
  p.add_argument('--schedules', default=DEFAULT_SCHEDULES)
  p.add_argument('--eta', type=float, default=0.0, help="ddim's noise scale")
  p.add_argument('--num_images', type=int, default=500)
  p.add_argument('--batch', type=int, default=100)
  p.add_argument('--seeds', default='0')
  p.add_argument('--json', default='')
  p.add_argument('--plot', default='')
  p.add_argument('--replot', default='', help='only redraw --plot from this JSON')
  args = p.parse_args(argv)
  if args.replot:
    with open(args.replot) as f:
      return plot(json.load(f), args.plot)

  from disa_jax.checkpoint import load_mar
  from disa_jax.eval.digits_quality import DigitsQuality
  from disa_jax.systems.mar.sampling import Sampler
  from disa_jax.systems.mar.variants import digits_config
  from disa_jax.tokenizers.image import PixelTokenizer

  config = digits_config()
  model = load_mar(config.checkpoint, overrides={'attn_splits': 0})
  s = config.sampling
  tok = PixelTokenizer(model.config, scale=config.tokenizer.scale)
  quality = DigitsQuality()
  sampler = Sampler(model, eta=args.eta)
  labels = np.arange(args.num_images) % model.config.class_num
  seeds = [int(x) for x in args.seeds.split(',')]
  points = []
  for solver in args.solvers.split(','):
    for spec in args.schedules.split(','):
      plan = step_plan(spec, s.num_iter)
      kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=s.cfg,
                cfg_schedule=s.cfg_schedule, temperature=s.temperature, solver=solver)
      per_seed, gen_s = [], 0.0
      for seed in seeds:
        out = []
        for lo in range(0, args.num_images, args.batch):
          ids = np.arange(lo, min(lo + args.batch, args.num_images))
          tokens = sampler.generate(labels[ids], jax.random.key(seed), image_ids=ids, **kw)
          gen_s += sampler.last_stats.wall_s
          out.append(tok.decode(np.asarray(tokens)))
        per_seed.append(quality.evaluate(np.concatenate(out), labels))
      rep = sampler.last_stats.plan.report()
      point = {'solver': solver, 'schedule': spec,
               'head_evals_per_image': rep['head_token_steps_per_image'],
               'steps_actual': rep['steps_actual'],
               'accuracy': float(np.mean([q['accuracy'] for q in per_seed])),
               'fd': float(np.mean([q['fd'] for q in per_seed])),
               'fd_per_seed': [float(q['fd']) for q in per_seed],
               'generate_s': round(gen_s, 2)}
      points.append(point)
      print(f"{solver:<9}{spec:<12}{point['head_evals_per_image']:>8}  acc "
            f"{point['accuracy']:.3f}  FD {point['fd']:7.2f}  ({gen_s:.1f} s)", flush=True)
  result = {'model': 'digits', 'num_images': args.num_images, 'seeds': seeds, 'cfg': s.cfg,
            'num_iter': s.num_iter, 'eta': args.eta, 'backend': jax.default_backend(),
            'load_avg': os.getloadavg()[0], 'time': time.strftime('%Y-%m-%d %H:%M'),
            'points': points}
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + '.partial', 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(args.json + '.partial', args.json)
  if args.plot:
    plot(result, args.plot)
  return result


def plot(result, path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {'ddpm': 'o', 'ddim': 's', 'dpmpp_2m': '^'}
  colors = {'ddpm': 'C0', 'ddim': 'C1', 'dpmpp_2m': 'C2'}
  for solver in dict.fromkeys(p['solver'] for p in result['points']):
    for family, style in (('disa', '-'), ('const', ':')):
      pts = sorted((p for p in result['points'] if p['solver'] == solver
                    and p['schedule'].startswith(family)), key=lambda p: p['head_evals_per_image'])
      if pts:
        ax.plot([p['head_evals_per_image'] for p in pts], [p['fd'] for p in pts], style,
                marker=markers.get(solver, 'x'), color=colors.get(solver),
                label=f"{solver}, {'DiSA linear' if family == 'disa' else 'constant'}")
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel('head evaluations per image (token-steps)')
  ax.set_ylabel('Frechet distance (digits classifier features), lower is better')
  ax.set_title(f"Head solvers on the bundled digits model ({result['num_images']} images, "
               f"seeds {result['seeds']}, CFG {result['cfg']})", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + '.partial.png'
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


if __name__ == '__main__':
  main()
