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
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.xar.config import OFFICIAL_SAMPLING, VARIANTS, variant_key
from disa_jax.systems.xar.convert import convert_state
from disa_jax.systems.xar.flops import run_flops
from disa_jax.systems.xar.sampling import XARSampler
from disa_jax.systems.xar.steps import preset_steps

PAPER_SPEEDUP = 1.6          # DiSA README, xAR (wall clock, GPU)


def _reference():
  try:
    import torch

    from reference.xar import XARRef
  except ImportError as e:
    raise UserError(f'the PyTorch comparison needs torch and the repo root on sys.path ({e}); '
                    'run from the repository root or pass --no-torch') from None
  return torch, XARRef


def run(variant: str, batch: int, *, repeats: int = 1, use_torch: bool = True, seed: int = 0,
        steps_scale: float = 1.0, arch=None) -> dict:
  """The benchmark as a dict; `arch` replaces the variant's official shapes (tests)."""
  key = variant_key(variant)
  arch = VARIANTS[key] if arch is None else arch
  cfg_scale = OFFICIAL_SAMPLING[key].cfg
  torch, XARRef = _reference()
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
  outs, times = {}, {name: [] for name in schedules}

  def sample(name):
    _, tokens = sampler.generate(labels, steps=schedules[name], cfg=cfg_scale,
                                 noise=noises[name], return_tokens=True)
    return jax.block_until_ready(tokens)

  for name, steps in schedules.items():          # first calls: compile + one run
    t0 = time.perf_counter()
    sample(name)
    first = time.perf_counter() - t0
    print(f'jax {name}: first call {first:.1f} s', file=sys.stderr, flush=True)
    fl = run_flops(arch, steps)
    result['runs'][name] = {'steps': steps, 'jax_first_call_s': first,
                            'tflop_per_image': fl['total'] / 1e12,
                            'evaluations': fl['evaluations']}
  for _ in range(repeats):                       # timed runs, schedules interleaved
    for name in schedules:
      t0 = time.perf_counter()
      outs[name] = np.asarray(sample(name))
      times[name].append(time.perf_counter() - t0)
      print(f'jax {name}: {times[name][-1]:.1f} s', file=sys.stderr, flush=True)
  for name in schedules:
    result['runs'][name]['jax_s_per_image'] = min(times[name]) / batch
  result['compile_count'] = sampler.compile_count
  if use_torch:
    labels_t = torch.as_tensor(labels)
    for name, steps in schedules.items():
      t_times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = ref.sample_tokens(labels_t, cfg_scale, steps, noises[name],
                                state_dtype=torch.float32).numpy()
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
  result['speedup_paper_readme'] = PAPER_SPEEDUP
  if use_torch:
    result['speedup_measured_torch'] = b['torch_s_per_image'] / d['torch_s_per_image']
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='B', help='B, L or H (official shapes, random weights)')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--repeats', type=int, default=1)
  p.add_argument('--steps-scale', type=float, default=1.0,
                 help='scale every step count (>= 3) for quicker runs')
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference runs')
  p.add_argument('--json', default='', help='also write the result to this file')
  a = p.parse_args(argv)
  try:
    res = run(a.variant, a.batch, repeats=a.repeats, use_torch=not a.no_torch,
              steps_scale=a.steps_scale)
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
