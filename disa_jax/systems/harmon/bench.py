"""Harmon sampling benchmark: the Harmon baseline (100 steps at every iteration, no clamp) vs
DiSA (linear U -> 5 with the 950 clamp, U in 100 / 50 / 25), JAX vs the PyTorch reference of
the official loop (`reference/harmon.py`) on the same random weights, prompts and schedule;
prints one JSON object.

  python -m disa_jax.systems.harmon.bench --variant=harmon_0_5b --batch=2 \\
      --image-size=256 --num-iter=16 [--torch] [--settings=baseline,disa_100_5,...]

Per setting: seconds (sampling, compile excluded), the JAX time split MAR encoder / LLM (prompt
prefill included) / MAR decoder / head (stages synchronised one by one, so the split costs a
little), compiles and padding, the FLOP model (`flops.harmon_flops`, official and as run), and
with --torch the reference's split and the JAX speed-up. --single-pass times one synchronised
pass per setting instead of warm-up + fused + split (full-size images on a CPU). Weights are
random (timing does not depend on them); the embedding table is cut to `--vocab` rows (only
prompt ids index it).
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
  return run_model(model, sampler, args, variant=args.variant)


def spec_prompts(vocab: int):
  """The spec's default prompt and the unconditional prompt as token ids (mod `vocab`)."""
  return [t % vocab for t in PROMPT], [t % vocab for t in UNCOND]


def run_model(model, sampler, args, *, variant: str, prompt=None, uncond=None) -> dict:
  """Times every setting of `args.settings` on `model` (one process, side by side)."""
  cfg = dataclasses.replace(model.config, image_size=sampler.mar_config.img_size)
  b = args.batch
  if prompt is None:
    prompt, uncond = spec_prompts(cfg.llm.vocab_size)
  prompts = [list(prompt)] * b
  out = {'variant': variant, 'image_size': cfg.image_size, 'num_iter': args.num_iter,
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
    if args.single_pass:
      # One synchronised pass (compile still excluded: the sampler compiles every bucket
      # before it starts the clock); its wall time stands for the fused time.
      sampler.generate(prompts, key, timed=True, **kw)
      first = {'compile_s': 0.0, 'compiles': {}}
      fused = timed = sampler.last_stats.as_dict()
    else:
      sampler.generate(prompts, key, **kw)                      # compile + warm up
      first = sampler.last_stats.as_dict()
      sampler.generate(prompts, key, **kw)
      fused = sampler.last_stats.as_dict()
      sampler.generate(prompts, key, timed=True, **kw)
      timed = sampler.last_stats.as_dict()
    plan = sampler.last_stats.plan
    flops = harmon_flops(cfg, plan, prompt_len=len(prompt), uncond_len=len(uncond))
    run_flops = harmon_flops(cfg, plan, prompt_len=len(prompt), uncond_len=len(uncond),
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


def disa_bench(config, *, batch_size: int, seed: int = 0, with_torch: bool = False,
               torch_threads: int = 0, settings=SETTINGS, log=print) -> dict:
  """`disa-bench` on a Harmon config: the baseline (100 steps) and the three DiSA settings
  (100 / 50 / 25 -> 5, clamp 950) side by side on the config's model (checkpoint or random
  weights) at `config.sampling.num_iter` iterations, with the phase split MAR encoder / LLM /
  MAR decoder / head. Prompts: the config's (with its tokenizer) if given, else the spec's
  default prompt as token ids."""
  from disa_jax.systems.harmon import system

  model, source = system.build_model(config, seed=seed)
  rt = config.runtime
  sampler = HarmonSampler(model, enc_bucket=rt.enc_bucket, prompt_bucket=rt.prompt_bucket,
                          max_head_waste=rt.max_head_waste,
                          matmul_precision=rt.matmul_precision or None)
  prompt = uncond = None
  if config.tokenizer.get('text'):
    ids, uncond = system.encoded_prompts(config)
    prompt = ids[0]
  args = argparse.Namespace(batch=batch_size, num_iter=config.sampling.num_iter,
                            settings=list(settings), torch=with_torch,
                            torch_settings=list(settings), threads=torch_threads or 2,
                            single_pass=False)
  log(f'model: {config.get("name", "?")} ({source}); settings {", ".join(settings)}')
  out = run_model(model, sampler, args, variant=config.get('name', ''), prompt=prompt,
                  uncond=uncond)
  out['model'] = source
  out.update(summary_runs(out, num_iter=args.num_iter, dtype=model.config.dtype))
  return out


def summary_runs(result: dict, *, num_iter: int, dtype: str) -> dict:
  """disa-bench's common per-run fields (what bench/gpu_suite.py tabulates): seconds per image,
  images/s, speed-up, FLOP-predicted speed-up, achieved TFLOP/s and its fraction of a matmul
  peak measured in this process."""
  from disa_jax.benchmark import matmul_peak

  peak = matmul_peak(jax.numpy.bfloat16 if dtype == 'bfloat16' else jax.numpy.float32)
  dev = jax.devices()[0]
  b = result['batch']
  runs = []
  for name, e in result['settings'].items():
    upper, lower = (100, 100) if name == 'baseline' else DISA_PRESETS[name]
    achieved = e['tflop_per_image_as_run']['total'] * b / e['jax_s']
    t = {}
    if 'torch_s' in e:
      t = {'s_per_image': round(e['torch_s'] / b, 4),
           'jax_over_torch': e['jax_speedup_vs_torch']}
    runs.append({
      'label': name, 'num_iter': num_iter, 'preset': 'mar' if name == 'baseline' else 'disa',
      'upper_steps': upper, 'lower_steps': lower, 'strategy': 'linear',
      'images_per_s': round(b / e['jax_s'], 4), 's_per_image': round(e['jax_s'] / b, 4),
      'speedup': e.get('speedup_vs_baseline', 1.0),
      'flop_speedup': e.get('flop_ratio_vs_baseline', 1.0),
      'achieved_tflops': round(achieved, 4), 'fraction_of_matmul_peak': achieved * 1e12 / peak,
      'compile_s': e['compile_s'], 'phase_s': e['jax_phase_s'], 'torch': t})
  return {'runs': runs, 'dtype': dtype, 'batch_size': b, 'device_kind': dev.device_kind,
          'devices': jax.device_count(), 'matmul_peak_tflops': round(peak / 1e12, 3)}


def format_table(result: dict) -> str:
  """One row per setting: seconds, speed-up, FLOP ratio and the phase split."""
  head = (f'{"setting":<12} {"s/batch":>8} {"speedup":>8} {"flop x":>7} {"encoder":>8} '
          f'{"llm":>8} {"decoder":>8} {"head":>8} {"head %":>7}')
  lines = [f'{result.get("variant", "")}: batch {result["batch"]}, {result["num_iter"]} '
           f'iterations, {result["image_size"]} px ({result["backend"]})', head]
  for name, e in result['settings'].items():
    ph = e['jax_phase_s']
    total = sum(ph.values()) or 1.0
    lines.append(f'{name:<12} {e["jax_s"]:>8.3f} {e.get("speedup_vs_baseline", 1.0):>8.2f} '
                 f'{e.get("flop_ratio_vs_baseline", 1.0):>7.2f} '
                 + ' '.join(f'{ph.get(k, 0.0):>8.3f}' for k in ('encoder', 'llm', 'decoder',
                                                                  'head'))
                 + f' {100 * ph.get("head", 0.0) / total:>6.1f}%')
  return '\n'.join(lines)


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
  p.add_argument('--single-pass', action='store_true',
                 help='one synchronised pass per setting (no warm-up, no separate fused pass): '
                      'for shapes too slow to run three times (512 px on a CPU)')
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
