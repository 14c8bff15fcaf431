"""xAR CPU/GPU benchmark: baseline vs DiSA speedup, FLOP-model prediction, JAX vs PyTorch.

  python -m disa_jax.systems.xar.bench --variant B --batch 4               # from the repo root
  python -m disa_jax.systems.xar.bench --variant B --batch 4 --steps-scale 0.2 --json b.json

Random weights with the official shapes (the reference's torch default init, converted with
the real converter, so JAX and PyTorch run identical weights), the variant's official cfg,
baseline = the xAR README steps in every cell, DiSA = the DiSA README schedule (50 -> 15); one
batch of `--batch` labels and identical injected noise on both sides. `--steps-scale` scales
every step count (>= 3) for a quicker run on a slow machine (the printed FLOP prediction uses the
scaled counts). Compile time is measured separately (first call); timed runs exclude it. Prints
one JSON object: seconds per image per run, DiSA/baseline speedup next to the FLOP-model
prediction and the DiSA README ratio, JAX/PyTorch time ratio and their max relative output
difference, compile counts. The PyTorch reference is `reference/xar.py` (repo root).

`disa-bench --config=configs/xar/b.py[:cpu|:tiny]` runs `benchmark_config` instead (`disa_bench`):
the config's model (checkpoint or random weights) through the engine sampler (`engine.py`,
per-image keys), runs `label=preset[:upper[:lower]]` (baseline: `label=baseline[:steps]`) or
`label=50/38/26/15` (default: the official baseline vs the config's DiSA schedule, both at the
config's cfg), compiled first, timed repeats interleaved across runs (side by side), the min
reported; FLOP-model TFLOP per image and the predicted speedup, compile counts, and with
`--phases` a synchronised pass giving each cell's seconds.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.common.bench import (
  add_speedups,
  compare_with_reference,
  fixed_width_table,
  reference_parser,
  run_reference_main,
  time_interleaved,
  torch_reference,
)
from disa_jax.systems.xar.config import OFFICIAL_SAMPLING, VARIANTS, variant_key
from disa_jax.systems.xar.convert import convert_state
from disa_jax.systems.xar.flops import run_flops
from disa_jax.systems.xar.sampling import XARSampler
from disa_jax.systems.xar.steps import preset_steps

PAPER_SPEEDUP = 1.6          # DiSA README, xAR (wall clock, GPU)


def run(variant: str, batch: int, *, repeats: int = 1, use_torch: bool = True, seed: int = 0,
        steps_scale: float = 1.0, arch=None) -> dict:
  """The benchmark as a dict; `arch` replaces the variant's official shapes (tests)."""
  key = variant_key(variant)
  arch = VARIANTS[key] if arch is None else arch
  cfg_scale = OFFICIAL_SAMPLING[key].cfg
  torch, XARRef = torch_reference('xar', 'XARRef')
  torch.manual_seed(seed)
  ref = XARRef(**arch.to_dict()).eval()
  from flax import nnx
  _, graphdef, state = convert_state({k: v.detach().numpy() for k, v in
                                      ref.state_dict().items()})
  sampler = XARSampler(nnx.merge(graphdef, state))
  labels = np.arange(batch) % arch.class_num

  def scaled(steps):
    return [max(3, round(n * steps_scale)) for n in steps]

  schedules = {'baseline': scaled(preset_steps('baseline', key)),
               'disa': scaled(preset_steps('disa', key))}
  rng = np.random.default_rng(seed)
  noises = {name: [(rng.standard_normal((batch, 64, arch.token_dim)).astype(np.float32),
                    rng.standard_normal((n - 1, batch, 64, arch.token_dim)).astype(np.float32))
                   for n in steps] for name, steps in schedules.items()}
  result = {'variant': f'xAR-{key}', 'batch': batch, 'cfg': cfg_scale,
            'device': jax.devices()[0].device_kind, 'repeats': repeats,
            'steps_scale': steps_scale, 'runs': {}}

  def sample(name, steps):
    _, tokens = sampler.generate(labels, steps=steps, cfg=cfg_scale, noise=noises[name],
                                 return_tokens=True)
    return jax.block_until_ready(tokens)

  def run_fields(steps):
    fl = run_flops(arch, steps)
    return {'tflop_per_image': fl['total'] / 1e12, 'evaluations': fl['evaluations']}

  labels_t = torch.as_tensor(labels)

  def torch_sample(name, steps):
    return ref.sample_tokens(labels_t, cfg_scale, steps, noises[name],
                             state_dtype=torch.float32).numpy()

  return compare_with_reference(result, schedules, sample=sample, run_fields=run_fields,
                                batch=batch, repeats=repeats,
                                compile_count=lambda: sampler.compile_count,
                                torch_sample=torch_sample if use_torch else None,
                                paper_speedup=PAPER_SPEEDUP)


def parse_runs(text: str | None, config) -> list[tuple[str, tuple[int, ...]]]:
  """(label, evaluations per cell) per run of `--runs` (None: baseline vs the config's DiSA)."""
  from disa_jax.systems.xar.system import stage_plan

  def plan(**fields):
    sub = config.sampling.copy_and_resolve_references()
    with sub.unlocked():
      sub.update({'strategy': '', 'steps': '', **fields})
    return stage_plan(sub).steps

  if not text:
    return [('baseline', plan(preset='baseline')), ('disa', plan(preset='disa'))]
  usage = ('expected label=baseline[:steps], label=disa[:upper[:lower]] or label=50/38/26/15')
  out = []
  for item in text.split(','):
    label, eq, body = item.partition('=')
    if not eq or not label or not body:
      raise UserError(f'bad xAR run {item!r}; {usage}')
    if '/' in body or body.isdigit():
      out.append((label, plan(steps=body.replace('/', ','))))
      continue
    preset, *counts = body.split(':')
    preset = {'mar': 'baseline'}.get(preset, preset)
    if preset not in ('baseline', 'disa') or len(counts) > (1 if preset == 'baseline' else 2):
      raise UserError(f'bad xAR run {item!r}; {usage}')
    try:
      ints = [int(c) for c in counts]
    except ValueError:
      raise UserError(f'bad xAR run {item!r}: step counts must be integers') from None
    fields = {'preset': preset}
    if ints and preset == 'baseline':
      fields['baseline_steps'] = ints[0]
    elif ints:
      fields.update(upper_steps=ints[0], lower_steps=ints[-1])
    out.append((label, plan(**fields)))
  return out


def benchmark_config(config, *, runs: str | None = None, batch_size: int = 4, repeats: int = 1,
                     phases: bool = False, seed: int = 0, cfg: float | None = None,
                     log=print) -> dict:
  """Baseline vs DiSA (or `runs`) through the engine sampler on the config's model, side by
  side in one process (`disa-bench` for xAR configs)."""
  from disa_jax.engine.runner import build_model
  from disa_jax.systems.xar.engine import XAREngineSampler
  from disa_jax.systems.xar.system import model_config, validate

  validate(config)
  specs = parse_runs(runs, config)                 # schedule errors before loading
  c = float(config.sampling.cfg if cfg is None else cfg)
  arch = model_config(config)
  model, source = build_model(config, seed=seed)
  sampler = XAREngineSampler(model, cfg=c,
                             matmul_precision=config.runtime.get('matmul_precision') or None)
  labels = np.arange(batch_size) % arch.class_num
  key = jax.random.key(seed)
  result = {'system': 'xar', 'config': config.get('name', ''), 'model': source,
            'batch_size': batch_size, 'cfg': c, 'backend': jax.default_backend(),
            'device_kind': jax.devices()[0].device_kind, 'repeats': repeats, 'runs': []}
  rows = []
  for label, steps in specs:
    plan = sampler.plan(batch_size, steps=steps, cfg=c)
    before = sampler.compile_count
    compile_s = sampler.compile(plan)
    sampler.generate(labels, key, steps=steps, cfg=c)          # first run (allocations)
    fl = run_flops(arch, steps)
    rows.append({'label': label, 'cfg': c, 'steps_requested': list(steps),
                 'steps_actual': list(steps), 'compile_s': round(compile_s, 3),
                 'compilations': sampler.compile_count - before,
                 'evaluations': fl['evaluations'],
                 'head_token_steps_per_image': plan.token_steps(),
                 'tflop_per_image': float(f'{fl["total"] / 1e12:.4g}')})
    log(f'[{label}] steps per cell {list(steps)}, cfg {c}: compiled in {compile_s:.1f} s')

  def generate(i):
    sampler.generate(labels, key, steps=specs[i][1], cfg=c)
    return sampler.last_stats.wall_s

  time_interleaved(rows, generate, repeats=repeats, batch_size=batch_size, log=log)
  if phases:
    for row, (label, steps) in zip(rows, specs, strict=True):
      sampler.generate(labels, key, steps=steps, cfg=c, timed=True)
      row['phases'] = {'cell_s': [round(t, 4) for t in sampler.last_stats.cell_s]}
      log(f'[{label}] seconds per cell: {row["phases"]["cell_s"]}')
  add_speedups(rows, lambda row: row['tflop_per_image'])
  result['runs'] = rows
  result['compile_count'] = sampler.compile_count
  result['speedup_paper_readme'] = PAPER_SPEEDUP
  return result


def format_table(result: dict) -> str:
  """A fixed-width table of a `benchmark_config` result."""
  header = ['run', 'steps per cell', 'cfg', 's/img', 'img/s', 'compiles', 'TFLOP/img', 'speedup',
            'FLOP pred.']
  has_ph = any('phases' in r for r in result['runs'])
  if has_ph:
    header.append('s per cell')
  rows = []
  for r in result['runs']:
    cells = [r['label'], '/'.join(map(str, r['steps_requested'])), r['cfg'],
             f'{r["s_per_image"]:.4f}', f'{r["images_per_s"]:.3f}', r['compilations'],
             f'{r["tflop_per_image"]:.4g}', f'{r["speedup"]:.2f}x', f'{r["flop_speedup"]:.2f}x']
    if has_ph:
      cells.append('/'.join(f'{t:.3f}' for t in r.get('phases', {}).get('cell_s', [])) or '-')
    rows.append(cells)
  title = (f'{result["config"]} | {result["model"]} | batch {result["batch_size"]} | '
           f'{result["backend"]} ({result["device_kind"]}) | DiSA README speedup '
           f'{result["speedup_paper_readme"]}x')
  return fixed_width_table(title, header, rows)


def main(argv=None) -> int:
  p = reference_parser(__doc__.splitlines()[0], default_variant='B',
                       variant_help='B, L or H (official shapes, random weights)')
  p.add_argument('--steps-scale', type=float, default=1.0,
                 help='scale every step count (>= 3) for quicker runs')
  return run_reference_main(
    p, argv, lambda a: run(a.variant, a.batch, repeats=a.repeats, use_torch=not a.no_torch,
                           steps_scale=a.steps_scale))


if __name__ == '__main__':
  sys.exit(main())

disa_bench = benchmark_config   # disa-bench's entry for xAR (systems/xar/commands.bench_command)
