"""Head solvers x step schedules on the bundled digits model: quality vs head evaluations.

  PYTHONPATH=. python bench/solver_frontier.py --num_images=500 --seeds=0 \
      --json=outputs/solver_frontier.json --plot=docs/solver_frontier.png

Every point generates the same images (labels, seed, generation orders) with one head solver
(`ddpm` = the official ancestral sampler, `ddim` with --eta, `dpmpp_2m`, `dpmpp_2m_sde`,
`ddpm_2m`) and one per-AR-step step list: DiSA linear upper -> lower (`disa:U:L`), the same
count at every AR step (`const:N`), an explicit list (`list:N1/N2/...`) or a `disa-tune` file
(`file:PATH`), all with DiSA's 950 timestep clamp (a tuned file: its own clamp; the digits
model, like every MAR, is poor at t = 999; `docs/benchmarks.md`). Quality is `eval/digits_quality.py` (classifier accuracy and
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
  if kind == 'list' and len(nums) == 1:
    return resolve_steps(num_iter=num_iter, preset='disa',
                         steps=[int(n) for n in nums[0].split('/')],
                         max_timestep=DISA_MAX_TIMESTEP)
  if kind == 'file' and nums:
    from disa_jax.tune import load_schedule

    sched = load_schedule(':'.join(nums), num_iter=num_iter, system='mar')
    return resolve_steps(num_iter=num_iter, preset='disa', steps=list(sched.steps),
                         max_timestep=sched.max_timestep)
  raise SystemExit(f'bad schedule {spec!r}; use disa:UPPER:LOWER, const:N, list:N1/N2/... '
                   '(one count per AR step) or file:TUNED.json (a disa-tune schedule)')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--solvers', default='ddpm,ddim,dpmpp_2m')
  p.add_argument('--schedules', default=DEFAULT_SCHEDULES)
  p.add_argument('--eta', type=float, default=0.0, help="ddim's noise scale")
  p.add_argument('--cfgs', default='', help='guidance scales to sweep (comma list; default: '
                 "the model config's), to compare solvers at matched accuracy")
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
  cfgs = [float(x) for x in args.cfgs.split(',')] if args.cfgs else [s.cfg]
  points = []
  for cfg, solver, spec in ((c, v, p) for c in cfgs for v in args.solvers.split(',')
                            for p in args.schedules.split(',')):
    plan = step_plan(spec, s.num_iter)
    kw = dict(steps=plan.steps, max_timestep=plan.max_timestep, cfg=cfg,
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
    point = {'solver': solver, 'schedule': spec, 'cfg': cfg,
             'head_evals_per_image': rep['head_token_steps_per_image'],
             'steps_actual': rep['steps_actual'],
             'accuracy': float(np.mean([q['accuracy'] for q in per_seed])),
             'fd': float(np.mean([q['fd'] for q in per_seed])),
             'fd_per_seed': [float(q['fd']) for q in per_seed],
             'generate_s': round(gen_s, 2)}
    points.append(point)
    print(f"{solver:<13}{spec:<12}cfg {cfg:<5}{point['head_evals_per_image']:>6}  acc "
          f"{point['accuracy']:.3f}  FD {point['fd']:7.2f}  ({gen_s:.1f} s)", flush=True)
  result = {'model': 'digits', 'num_images': args.num_images, 'seeds': seeds, 'cfg': cfgs,
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
  markers = {'ddpm': 'o', 'ddim': 's', 'dpmpp_2m': '^', 'dpmpp_2m_sde': 'v',
             'ddpm_2m': 'x'}
  colors = {'ddpm': 'C0', 'ddim': 'C1', 'dpmpp_2m': 'C2', 'dpmpp_2m_sde': 'C3',
            'ddpm_2m': 'C4'}
  default_cfg = result['cfg'] if not isinstance(result['cfg'], list) else result['cfg'][0]
  cfg_of = lambda p: p.get('cfg', default_cfg)  # noqa: E731
  several = len({cfg_of(p) for p in result['points']}) > 1
  for solver, cfg in dict.fromkeys((p['solver'], cfg_of(p)) for p in result['points']):
    for family, style in (('disa', '-'), ('const', ':')):
      pts = sorted((p for p in result['points'] if p['solver'] == solver and cfg_of(p) == cfg
                    and p['schedule'].startswith(family)), key=lambda p: p['head_evals_per_image'])
      if pts:
        ax.plot([p['head_evals_per_image'] for p in pts], [p['fd'] for p in pts], style,
                marker=markers.get(solver, 'x'), color=colors.get(solver),
                label=f"{solver}, {'DiSA linear' if family == 'disa' else 'constant'}"
                      + (f', CFG {cfg}' if several else ''))
    for family, marker in (('list', 'P'), ('file', '*')):
      pts = [p for p in result['points'] if p['solver'] == solver and cfg_of(p) == cfg
             and p['schedule'].startswith(family)]
      if pts:
        ax.scatter([p['head_evals_per_image'] for p in pts], [p['fd'] for p in pts], s=60,
                   marker=marker, color=colors.get(solver),
                   label=f"{solver}, {'explicit lists' if family == 'list' else 'disa-tune'}"
                         + (f', CFG {cfg}' if several else ''))
  ax.set_xscale('log')
  ax.set_yscale('log')
  evals = [p['head_evals_per_image'] for p in result['points']]
  ax.set_xticks([x for x in (100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 6000)
                 if min(evals) / 1.5 <= x <= max(evals) * 1.5])
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
  ax.set_xlabel('head evaluations per image (token-steps)')
  ax.set_ylabel('Frechet distance (digits classifier features), lower is better')
  ax.set_title(f"Head solvers on the bundled digits model ({result['num_images']} images, "
               f"seeds {result['seeds']}, CFG {'per line' if several else default_cfg})",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + '.partial.png'
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


if __name__ == '__main__':
  main()
