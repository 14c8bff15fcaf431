"""FlowAR CPU/GPU benchmark: baseline vs DiSA speedup, FLOP-model prediction, JAX vs PyTorch.

  python -m disa_jax.systems.flowar.bench --variant S --batch 4            # from the repo root
  python -m disa_jax.systems.flowar.bench --variant L --batch 4 --no-torch --json out.json

Random weights with the official shapes (torch default init of the reference model, converted
with the real converter, so JAX and PyTorch run identical weights), the official sampling
settings of the variant (cfg, guidance; baseline = official steps, DiSA = the DiSA README
schedule), one batch of `--batch` labels, identical injected noise on both sides. Compile time is
measured separately (first call); timed runs exclude it. Prints one JSON object: seconds per
image for each run, speedup DiSA/baseline next to the FLOP-model prediction and the DiSA README
ratio, JAX/PyTorch time ratio and the max relative difference of their outputs, compile counts.
The PyTorch reference lives in `reference/flowar.py` (repo root, not installed).

`disa-bench --config=configs/flowar/s.py[:cpu]` runs `benchmark_config` instead: the config's
model (checkpoint or random weights) through the engine sampler (`engine.py`, per-image keys),
runs `label=preset[:upper[:lower]]` or `label=25/22/20/17/15` (default: the official baseline
at `baseline_cfg` and the config's DiSA schedule at `cfg`), compiled first, timed repeats
interleaved across runs (side by side), min reported; FLOP-model TFLOP per image and the
predicted speedup, compile counts, and with `--phases` a synchronised pass splitting each
scale into trunk and the rest (flow-head Euler solve + next-scale input).
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
from disa_jax.systems.flowar.config import OFFICIAL_SAMPLING, VARIANTS, variant_key
from disa_jax.systems.flowar.convert import convert_state
from disa_jax.systems.flowar.flops import run_flops
from disa_jax.systems.flowar.sampling import FlowARSampler
from disa_jax.systems.flowar.steps import preset_steps

PAPER_SPEEDUP = {'S': 1.5, 'L': 1.5, 'H': 2.5}      # DiSA README (wall clock, GPU)


def run(variant: str, batch: int, *, repeats: int = 1, use_torch: bool = True,
        seed: int = 0, arch=None) -> dict:
  """The benchmark as a dict; `arch` replaces the variant's official shapes (tests)."""
  key = variant_key(variant)
  arch = VARIANTS[key] if arch is None else arch
  settings = OFFICIAL_SAMPLING[key]
  cfg_scale = settings.disa_cfg or settings.cfg
  torch, FlowARRef = torch_reference('flowar', 'FlowARRef')
  torch.manual_seed(seed)
  ref = FlowARRef(**arch.to_dict()).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  from flax import nnx
  _, graphdef, state = convert_state(sd)
  del sd
  sampler = FlowARSampler(nnx.merge(graphdef, state))
  labels = np.arange(batch) % arch.class_num
  rows = 2 * batch if cfg_scale != 1.0 else batch
  rng = np.random.default_rng(seed)
  noise = [rng.standard_normal((rows, s * s, arch.token_dim)).astype(np.float32)
           for s in arch.scales]
  schedules = {'baseline': preset_steps('baseline', key), 'disa': preset_steps('disa', key)}
  result = {'variant': f'FlowAR-{key}', 'batch': batch, 'cfg': cfg_scale,
            'guidance': settings.guidance, 'device': jax.devices()[0].device_kind,
            'repeats': repeats, 'runs': {}}

  def sample(name, steps):
    return jax.block_until_ready(sampler.generate(labels, steps=steps, cfg=cfg_scale,
                                                  guidance=settings.guidance, noise=noise))

  def run_fields(steps):
    fl = run_flops(arch, steps, cfg_scale=cfg_scale)
    return {'tflop_per_image': fl['total'] / 1e12, 'head_flop_share': fl['head'] / fl['total']}

  labels_t, noise_t = torch.as_tensor(labels), [torch.from_numpy(n) for n in noise]

  def torch_sample(name, steps):
    with torch.no_grad():
      return ref.sample_tokens(labels_t, cfg=cfg_scale, guidance=settings.guidance,
                               noise=noise_t, steps=steps).numpy()

  return compare_with_reference(result, schedules, sample=sample, run_fields=run_fields,
                                batch=batch, repeats=repeats,
                                compile_count=lambda: sampler.compile_count,
                                torch_sample=torch_sample if use_torch else None,
                                paper_speedup=PAPER_SPEEDUP[key])


def parse_runs(text: str | None, config) -> list[tuple[str, tuple[int, ...], float]]:
  """(label, requested steps per scale, cfg) per run of `--runs` (None: baseline vs DiSA)."""
  from disa_jax.systems.flowar.system import stage_plan

  s = config.sampling
  if not text:
    base = config.sampling.copy_and_resolve_references()
    with base.unlocked():
      base.update(preset='baseline', strategy='', steps='')
    disa = config.sampling.copy_and_resolve_references()
    with disa.unlocked():
      disa.update(preset='disa', strategy='', steps='')
    return [('baseline', stage_plan(base).steps, float(s.baseline_cfg)),
            ('disa', stage_plan(disa).steps, float(s.cfg))]
  out = []
  for item in text.split(','):
    label, eq, body = item.partition('=')
    if not eq or not label or not body:
      raise UserError(f'bad FlowAR run {item!r}; expected label=preset[:upper[:lower]] '
                      '(preset baseline or disa) or label=25/22/20/17/15')
    sub = config.sampling.copy_and_resolve_references()
    with sub.unlocked():
      if '/' in body or body.isdigit():
        sub.update(steps=body.replace('/', ','), strategy='')
      else:
        preset, *counts = body.split(':')
        if preset not in ('baseline', 'mar', 'disa') or len(counts) > 2:
          raise UserError(f'bad FlowAR run {item!r}; expected label=preset[:upper[:lower]] '
                          '(preset baseline or disa) or label=25/22/20/17/15')
        try:
          ints = [int(c) for c in counts]
        except ValueError:
          raise UserError(f'bad FlowAR run {item!r}: upper / lower must be integers') from None
        sub.update(preset=preset, strategy='', steps='')
        if ints:
          sub.update(upper_steps=ints[0], lower_steps=ints[-1])
    out.append((label, stage_plan(sub).steps, float(s.cfg)))
  return out


def benchmark_config(config, *, runs: str | None = None, batch_size: int = 4, repeats: int = 1,
                     phases: bool = False, seed: int = 0, cfg: float | None = None,
                     log=print) -> dict:
  """Baseline vs DiSA (or `runs`) through the engine sampler on the config's model."""
  from disa_jax.engine.runner import build_model
  from disa_jax.systems.flowar.engine import FlowAREngineSampler
  from disa_jax.systems.flowar.system import model_config, validate

  validate(config)
  specs = parse_runs(runs, config)                # schedule errors before loading
  if cfg is not None:
    specs = [(label, steps, float(cfg)) for label, steps, _ in specs]
  arch = model_config(config)
  model, source = build_model(config, seed=seed)
  solver = config.sampling.get('solver', 'euler')
  sampler = FlowAREngineSampler(model, guidance=config.sampling.guidance, solver=solver,
                                matmul_precision=config.runtime.get('matmul_precision') or None)
  labels = np.arange(batch_size) % arch.class_num
  key = jax.random.key(seed)
  result = {'config': config.get('name', ''), 'model': source, 'batch_size': batch_size,
            'guidance': config.sampling.guidance, 'solver': solver, 'backend': jax.default_backend(),
            'device_kind': jax.devices()[0].device_kind, 'repeats': repeats, 'runs': []}
  rows = []
  for label, steps, c in specs:
    plan = sampler.plan(batch_size, steps=steps, cfg=c)
    before = set(sampler.compile_log)
    compile_s = sampler.compile(plan)
    sampler.generate(labels, key, steps=steps, cfg=c)          # first run (allocations)
    fl = run_flops(arch, steps, cfg_scale=c, solver=solver)
    rows.append({'label': label, 'cfg': c, 'steps_requested': list(steps),
                 'steps_actual': list(plan.evals), 'compile_s': round(compile_s, 3),
                 'compilations': sum(1 for k in sampler.compile_log if k not in before
                                     and k[0] == 'scale'),
                 'head_token_steps_per_image': plan.head_token_steps(),
                 'tflop_per_image': {k: float(f'{v / 1e12:.4g}') for k, v in fl.items()}})
    log(f'[{label}] steps {list(steps)} (evaluations {list(plan.evals)}), cfg {c}: compiled '
        f'in {compile_s:.1f} s')

  def generate(i):
    _, steps, c = specs[i]
    sampler.generate(labels, key, steps=steps, cfg=c)
    return sampler.last_stats.wall_s

  time_interleaved(rows, generate, repeats=repeats, batch_size=batch_size, log=log)
  if phases:
    for row, (label, steps, c) in zip(rows, specs, strict=True):
      sampler.generate(labels, key, steps=steps, cfg=c, timed=True)
      st = sampler.last_stats
      row['phases'] = {'trunk_s': round(st.trunk_s, 4), 'head_s': round(st.head_s, 4)}
      log(f'[{label}] phases: trunk {st.trunk_s:.3f} s, head + next-scale {st.head_s:.3f} s')
  add_speedups(rows, lambda row: row['tflop_per_image']['total'])
  result['runs'] = rows
  result['compile_count'] = sampler.inner.compile_count
  key_v = config.get('variant', '')
  if key_v in PAPER_SPEEDUP:
    result['speedup_paper_readme'] = PAPER_SPEEDUP[key_v]
  return result


def format_table(result: dict) -> str:
  """A fixed-width table of a `benchmark_config` result."""
  header = ['run', 'steps', 'evals', 'cfg', 's/img', 'img/s', 'compiles', 'TFLOP/img',
            'speedup', 'FLOP pred.']
  has_ph = any('phases' in r for r in result['runs'])
  if has_ph:
    header += ['trunk s', 'head s']
  rows = []
  for r in result['runs']:
    cells = [r['label'], '/'.join(map(str, r['steps_requested'])),
             '/'.join(map(str, r['steps_actual'])), r['cfg'], f'{r["s_per_image"]:.4f}',
             f'{r["images_per_s"]:.3f}', r['compilations'],
             f'{r["tflop_per_image"]["total"]:.4g}', f'{r["speedup"]:.2f}x',
             f'{r["flop_speedup"]:.2f}x']
    if has_ph:
      ph = r.get('phases', {})
      cells += [ph.get('trunk_s', '-'), ph.get('head_s', '-')]
    rows.append(cells)
  title = (f'{result["config"]} | {result["model"]} | batch {result["batch_size"]} | guidance '
           f'{result["guidance"]} | {result["backend"]} ({result["device_kind"]})')
  if result.get('solver', 'euler') != 'euler':
    title += f' | solver {result["solver"]}'
  if 'speedup_paper_readme' in result:
    title += f' | DiSA README speedup {result["speedup_paper_readme"]}x'
  return fixed_width_table(title, header, rows)


def main(argv=None) -> int:
  p = reference_parser(__doc__.splitlines()[0], default_variant='S',
                       variant_help='S, L or H (official shapes, random weights)')
  return run_reference_main(
    p, argv, lambda a: run(a.variant, a.batch, repeats=a.repeats, use_torch=not a.no_torch))


if __name__ == '__main__':
  sys.exit(main())

disa_bench = benchmark_config   # disa-bench's entry for FlowAR (commands.bench_command)
