"""Harmon sampling benchmark: the Harmon baseline (100 steps at every iteration, no clamp) vs
DiSA (linear U -> 5 with the 950 clamp, U in 100 / 50 / 25), JAX vs the PyTorch reference of
the official loop (`reference/harmon.py`) on the same random weights, prompts and schedule;
prints one JSON object.

  python -m disa_jax.systems.harmon.bench --variant=harmon_0_5b --batch=2 \\
      --image-size=256 --num-iter=16 [--torch] [--settings=baseline,disa_100_5,...]

Per setting: seconds (sampling, compile excluded), the JAX time split MAR encoder / LLM (prompt
prefill included) / MAR decoder / head (stages synchronised one by one, so the split costs a
little), compiles and padding, the FLOP model (`flops.harmon_flops`, official and as run), and
with --torch the reference's split and the JAX speed-up. Weights are random (timing does not
depend on them); the embedding table is cut to `--vocab` rows (only prompt ids index it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from disa_jax.schedules import step_schedule
from disa_jax.systems.harmon.config import DISA_PRESETS, VARIANTS, HarmonConfig
from disa_jax.systems.harmon.flops import harmon_flops
from disa_jax.systems.harmon.model import Harmon
from disa_jax.systems.harmon.sampler import HarmonSampler

SETTINGS = ('baseline', *DISA_PRESETS)
# Token ids of the spec's default prompt (§2.1) and the unconditional prompt, mod --vocab.
PROMPT = [151644, 872, 198, 31115, 458, 2168, 25, 264, 5562, 389, 279, 2115, 323, 264, 8251,
          389, 279, 1290, 13, 151645, 198, 151644, 77091, 198]
UNCOND = [151644, 872, 198, 31115, 458, 2168, 13, 151645, 198, 151644, 77091, 198]


def schedule(setting: str, num_iter: int):
  if setting == 'baseline':
    return [100] * num_iter, None
  upper, lower = DISA_PRESETS[setting]
  return step_schedule('linear', num_iter, upper, lower), 950


def bench_config(variant: str, *, image_size: int, vocab: int, layers: int = 0,
                 mar_depth: int = 0) -> HarmonConfig:
  """The variant's widths (and head geometry); depths cut to `layers` / `mar_depth` if given."""
  c = VARIANTS[variant]
  llm = dataclasses.replace(c.llm, vocab_size=vocab,
                            num_hidden_layers=layers or c.llm.num_hidden_layers)
  mar = dataclasses.replace(c.mar, encoder_depth=mar_depth or c.mar.encoder_depth,
                            decoder_depth=mar_depth or c.mar.decoder_depth)
  return dataclasses.replace(c, llm=llm, mar=mar, image_size=image_size)


def run(args) -> dict:
  cfg = bench_config(args.variant, image_size=args.image_size, vocab=args.vocab,
                     layers=args.llm_layers, mar_depth=args.mar_depth)
  model = Harmon(cfg, rngs=nnx.Rngs(0))
  sampler = HarmonSampler(model, enc_bucket=args.enc_bucket)
  b = args.batch
  prompts = [[t % args.vocab for t in PROMPT]] * b
  uncond = [t % args.vocab for t in UNCOND]
  out = {'variant': args.variant, 'image_size': args.image_size, 'num_iter': args.num_iter,
         'batch': b, 'cfg': 3.0, 'llm_layers': cfg.llm.num_hidden_layers,
         'mar_depth': cfg.mar.encoder_depth, 'enc_bucket': sampler.enc_bucket,
         'backend': jax.default_backend(), 'settings': {}}
  ref = None
  if args.torch:
    import torch

    from disa_jax.convert.mapping import flax_state_to_torch
    from reference.harmon import TorchHarmon, load_from_flax, sample

    torch.set_num_threads(max(1, args.threads))
    ref = load_from_flax(TorchHarmon(cfg, attn_implementation='sdpa'),
                         flax_state_to_torch(nnx.state(model)))
    rows = prompts + [uncond] * b
    lp = max(map(len, rows))
    ids = np.zeros((len(rows), lp), np.int64)
    valid = np.zeros((len(rows), lp), bool)
    for i, r in enumerate(rows):
      ids[i, :len(r)], valid[i, :len(r)] = r, True
  for setting in args.settings:
    steps, clip = schedule(setting, args.num_iter)
    key = jax.random.key(0)
    kw = dict(uncond_ids=uncond, steps=steps, max_timestep=clip, cfg=3.0,
              cfg_schedule='constant')
    sampler.generate(prompts, key, **kw)                        # compile + warm up
    first = sampler.last_stats.as_dict()
    sampler.generate(prompts, key, **kw)
    fused = sampler.last_stats.as_dict()
    sampler.generate(prompts, key, timed=True, **kw)
    timed = sampler.last_stats.as_dict()
    plan = sampler.last_stats.plan
    flops = harmon_flops(cfg, plan, prompt_len=len(PROMPT), uncond_len=len(UNCOND))
    run_flops = harmon_flops(cfg, plan, prompt_len=len(PROMPT), uncond_len=len(UNCOND),
                             padded_prompt=fused['prompt_len'], official=False)
    entry = {'jax_s': fused['wall_s'], 'jax_timed_s': timed['wall_s'],
             'jax_phase_s': timed['phase_s'], 'compile_s': first['compile_s'] + timed['compile_s'],
             'compiles': {**first['compiles'], **timed['compiles']},
             'prompt_len': fused['prompt_len'], 'prompt_pad': fused['prompt_pad'],
             **{k: fused[k] for k in ('head_padding_waste', 'encoder_padding_waste',
                                      'backbone_buckets', 'head_buckets')},
             'steps_requested': sum(steps), 'steps_actual': sum(s.actual_steps for s in plan.steps),
             'tflop_per_image': {k: round(v / 1e12, 4) for k, v in flops.items()},
             'tflop_per_image_as_run': {k: round(v / 1e12, 4) for k, v in run_flops.items()}}
    if ref is not None and setting in args.torch_settings:
      timings: dict = {}
      t0 = time.perf_counter()
      sample(ref, ids, valid, num_iter=args.num_iter, cfg=3.0, cfg_schedule='constant',
             steps=steps, clip=clip, grid=cfg.runtime_mar.seq_h, timings=timings)
      entry['torch_s'] = round(time.perf_counter() - t0, 3)
      entry['torch_phase_s'] = {k: round(v, 3) for k, v in timings.items()}
      entry['jax_speedup_vs_torch'] = round(entry['torch_s'] / fused['wall_s'], 2)
    out['settings'][setting] = entry
    print(json.dumps({setting: entry}), file=sys.stderr, flush=True)
  base = out['settings'].get('baseline')
  if base:
    for e in out['settings'].values():
      e['speedup_vs_baseline'] = round(base['jax_s'] / e['jax_s'], 3)
      e['flop_ratio_vs_baseline'] = round(base['tflop_per_image']['total']
                                          / e['tflop_per_image']['total'], 3)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='harmon_0_5b', choices=sorted(VARIANTS))
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--image-size', type=int, default=256)
  p.add_argument('--num-iter', type=int, default=16)
  p.add_argument('--vocab', type=int, default=4096)
  p.add_argument('--llm-layers', type=int, default=0, help='0: the variant\'s depth')
  p.add_argument('--mar-depth', type=int, default=0, help='encoder = decoder blocks; 0: variant')
  p.add_argument('--enc-bucket', type=int, default=0, help='0: seq_len / 16')
  p.add_argument('--compilation-cache', default='~/.cache/disa_jax/xla',
                 help="persistent XLA cache ('' disables)")
  p.add_argument('--settings', default=','.join(SETTINGS))
  p.add_argument('--torch', action='store_true', help='also time the PyTorch reference')
  p.add_argument('--torch-settings', default='baseline,disa_50_5')
  p.add_argument('--threads', type=int, default=2)
  args = p.parse_args(argv)
  if args.compilation_cache:
    import os

    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(args.compilation_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  args.settings = [s for s in args.settings.split(',') if s]
  args.torch_settings = [s for s in args.torch_settings.split(',') if s]
  bad = [s for s in args.settings if s not in SETTINGS]
  if bad:
    p.error(f'unknown settings {bad}; choose from {", ".join(SETTINGS)}')
  print(json.dumps(run(args), indent=1))


if __name__ == '__main__':
  main()
