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
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import OFFICIAL_SAMPLING, VARIANTS, variant_key
from disa_jax.systems.flowar.convert import convert_state
from disa_jax.systems.flowar.flops import run_flops
from disa_jax.systems.flowar.sampling import FlowARSampler
from disa_jax.systems.flowar.steps import preset_steps

PAPER_SPEEDUP = {'S': 1.5, 'L': 1.5, 'H': 2.5}      # DiSA README (wall clock, GPU)


def _reference():
  try:
    import torch

    from reference.flowar import FlowARRef
  except ImportError as e:
    raise UserError(f'the PyTorch comparison needs torch and the repo root on sys.path ({e}); '
                    'run from the repository root or pass --no-torch') from None
  return torch, FlowARRef


def run(variant: str, batch: int, *, repeats: int = 1, use_torch: bool = True,
        seed: int = 0, arch=None) -> dict:
  """The benchmark as a dict; `arch` replaces the variant's official shapes (tests)."""
  key = variant_key(variant)
  arch = VARIANTS[key] if arch is None else arch
  settings = OFFICIAL_SAMPLING[key]
  cfg_scale = settings.disa_cfg or settings.cfg
  torch, FlowARRef = _reference()
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
  outs, times = {}, {name: [] for name in schedules}

  def sample(steps):
    return jax.block_until_ready(sampler.generate(labels, steps=steps, cfg=cfg_scale,
                                                  guidance=settings.guidance, noise=noise))

  for name, steps in schedules.items():          # first calls: compile + one run
    t0 = time.perf_counter()
    sample(steps)
    first = time.perf_counter() - t0
    print(f'jax {name}: first call {first:.1f} s', file=sys.stderr, flush=True)
    fl = run_flops(arch, steps, cfg_scale=cfg_scale)
    result['runs'][name] = {
      'steps': steps, 'jax_first_call_s': first, 'tflop_per_image': fl['total'] / 1e12,
      'head_flop_share': fl['head'] / fl['total']}
  for _ in range(repeats):                       # timed runs, schedules interleaved
    for name, steps in schedules.items():
      t0 = time.perf_counter()
      outs[name] = np.asarray(sample(steps))
      times[name].append(time.perf_counter() - t0)
      print(f'jax {name}: {times[name][-1]:.1f} s', file=sys.stderr, flush=True)
  for name in schedules:
    result['runs'][name]['jax_s_per_image'] = min(times[name]) / batch
  result['compile_count'] = sampler.compile_count
  if use_torch:
    labels_t = torch.as_tensor(labels)
    noise_t = [torch.from_numpy(n) for n in noise]
    for name, steps in schedules.items():
      t_times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
          out = ref.sample_tokens(labels_t, cfg=cfg_scale, guidance=settings.guidance,
                                  noise=noise_t, steps=steps).numpy()
        t_times.append(time.perf_counter() - t0)
      print(f'torch {name}: {min(t_times):.1f} s', file=sys.stderr, flush=True)
      r = result['runs'][name]
      r['torch_s_per_image'] = min(t_times) / batch
      r['jax_over_torch_time'] = r['jax_s_per_image'] / r['torch_s_per_image']
      r['max_rel_diff_jax_vs_torch'] = float(np.abs(outs[name] - out).max()
                                             / np.abs(out).max())
  b, d = result['runs']['baseline'], result['runs']['disa']
  result['speedup_measured'] = b['jax_s_per_image'] / d['jax_s_per_image']
  result['speedup_flop_model'] = b['tflop_per_image'] / d['tflop_per_image']
  result['speedup_paper_readme'] = PAPER_SPEEDUP[key]
  if use_torch:
    result['speedup_measured_torch'] = b['torch_s_per_image'] / d['torch_s_per_image']
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='S', help='S, L or H (official shapes, random weights)')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference runs')
  p.add_argument('--json', default='', help='also write the result to this file')
  a = p.parse_args(argv)
  try:
    res = run(a.variant, a.batch, repeats=a.repeats, use_torch=not a.no_torch)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(res, indent=2)
  print(text)
  if a.json:
    with open(a.json, 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
