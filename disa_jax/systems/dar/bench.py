"""D-AR CPU benchmark: JAX vs the PyTorch reference (reference/dar.py) in one run, random
weights shared by both (the JAX models are converted from the torch state dicts).

  python -m disa_jax.systems.dar.bench                         # GPT-L shapes, batch 4
  python -m disa_jax.systems.dar.bench --gpt=xl --nfe=8        # GPT-XL, full 8-NFE decode
  python -m disa_jax.systems.dar.bench --small                 # toy widths (smoke test)

Prints one JSON object:
  gpt: seconds for B images x 256 ids (FID setting: CFG "1.2,8.0", i.e. 2B rows), tokens/s,
       seconds per image, compile seconds (JAX: prefill + step, once), for jax and torch;
  decoder: seconds for `nfe` pixel-decoder NFEs on B images at the official tokenizer sizes,
       seconds per image extrapolated to the 8 NFEs of a full decode (x 8 / nfe; 1 NFE by
       default because one NFE of the official decoder costs 336 GFLOP per image);
  ratio_jax_over_torch per phase and for the total (GPT + 8-NFE decoder) per image.
Run it from the repository root (the reference is imported as `reference.dar`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _gpt_pair(variant: str, small: bool, seed: int):
  import torch
  from flax import nnx

  from disa_jax.systems.dar.convert import GPT_DROP, fill_state, gpt_key_table
  from disa_jax.systems.dar.gpt import GPT, GPT_VARIANTS, GPTConfig
  from reference import dar as ref

  arch = dict(dim=128, n_layer=2, n_head=2) if small else GPT_VARIANTS[variant]
  tm = ref.GPT(**arch)
  ref.randomize_(tm, seed)
  tm.eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  cfg = GPTConfig(**arch)
  jm = fill_state(lambda: GPT(cfg, rngs=nnx.Rngs(0)), gpt_key_table(cfg), sd, GPT_DROP, 'GPT')
  del sd
  torch.set_grad_enabled(False)
  return tm, jm


def _tokenizer_pair(small: bool, seed: int):
  from flax import nnx

  from disa_jax.systems.dar.convert import TOKENIZER_DROP, fill_state, tokenizer_key_table
  from disa_jax.systems.dar.tokenizer import Tokenizer, TokenizerConfig
  from reference import dar as ref

  arch = dict(width=64, enc_layers=1, dec_layers=1, flow_width=64, flow_depth=1) if small else {}
  tm = ref.Tokenizer(**arch)
  ref.randomize_(tm, seed, scale=0.5)
  tm.eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  names = dict(enc_layers='encoder_layers', dec_layers='decoder_layers')
  cfg = TokenizerConfig(**{names.get(k, k): v for k, v in arch.items()})
  jm = fill_state(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0)), tokenizer_key_table(cfg), sd,
                  TOKENIZER_DROP, 'tokenizer')
  return tm, jm


def bench_gpt(variant='l', batch=4, small=False, seed=0, cfg='1.2,8.0') -> dict:
  import jax
  import torch

  from disa_jax.systems.dar.sampling import Sampler, SamplingOptions
  from reference import dar as ref

  tm, jm = _gpt_pair(variant, small, seed)
  L = jm.cfg.block_size
  labels = np.arange(batch) % 1000
  u = np.random.default_rng(seed).random((batch, L)).astype(np.float32)
  sampler = Sampler(jm)
  opts = SamplingOptions(cfg=cfg)
  t0 = time.perf_counter()
  sampler.generate(labels, uniforms=u, options=opts, decode=False, num_tokens=2)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = sampler.generate(labels, uniforms=u, options=opts, decode=False)
  jax_s = time.perf_counter() - t0
  jax.block_until_ready(out.ids)
  t0 = time.perf_counter()
  want = ref.generate(tm, torch.from_numpy(labels), torch.from_numpy(u), cfg=cfg).numpy()
  torch_s = time.perf_counter() - t0
  return {
    'variant': 'toy' if small else variant, 'batch': batch, 'ids_per_image': L, 'cfg': cfg,
    'jax_s': jax_s, 'torch_s': torch_s, 'jax_compile_s': compile_s,
    'jax_tokens_per_s': batch * L / jax_s, 'torch_tokens_per_s': batch * L / torch_s,
    'jax_s_per_image': jax_s / batch, 'torch_s_per_image': torch_s / batch,
    'ratio_jax_over_torch': jax_s / torch_s,
    'ids_equal': bool((out.ids == want).all()), 'first_differing_position': _first_diff(
      out.ids, want), 'compiles': dict(sampler.compiles),
  }


def _first_diff(a, b):
  """First id position where the two implementations' samples differ (None: all equal);
  after it the sequences are conditioned on different ids and diverge."""
  cols = np.nonzero((np.asarray(a) != np.asarray(b)).any(axis=0))[0]
  return int(cols[0]) if cols.size else None


def bench_decoder(batch=4, nfe=1, small=False, seed=0) -> dict:
  import torch

  from disa_jax.systems.dar.sampling import TokenizerRunner

  tm, jm = _tokenizer_pair(small, seed)
  run = TokenizerRunner(jm)
  cfg = jm.cfg
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.codebook_size, (batch, cfg.num_queries))
  noise = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  clip = None if nfe >= cfg.num_steps else nfe
  t0 = time.perf_counter()
  run.decode(ids, noise, clip_steps=clip)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  got = run.decode(ids, noise, clip_steps=clip)
  jax_s = time.perf_counter() - t0
  nchw = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
  t0 = time.perf_counter()
  with torch.no_grad():
    want = tm.decode_code(torch.from_numpy(ids), nchw, clip_steps=clip).numpy()
  torch_s = time.perf_counter() - t0
  err = float(np.abs(got - want.transpose(0, 2, 3, 1)).max() / np.abs(want).max())
  scale = cfg.num_steps / min(nfe, cfg.num_steps)
  return {
    'tokenizer': 'toy' if small else 'v1', 'batch': batch, 'nfe': min(nfe, cfg.num_steps),
    'jax_s': jax_s, 'torch_s': torch_s, 'jax_compile_s': compile_s,
    'jax_s_per_image_8nfe': jax_s * scale / batch, 'torch_s_per_image_8nfe': torch_s * scale / batch,
    'ratio_jax_over_torch': jax_s / torch_s, 'max_rel_error_vs_torch': err,
    'compiles': dict(run.compiles),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--gpt', default='l', choices=['l', 'xl'])
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--nfe', type=int, default=1, help='decoder NFEs timed (1..8)')
  p.add_argument('--cfg', default='1.2,8.0')
  p.add_argument('--small', action='store_true', help='toy widths (smoke test)')
  p.add_argument('--skip-decoder', action='store_true')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0 = torch default)')
  a = p.parse_args(argv)
  import torch
  if a.threads:
    torch.set_num_threads(a.threads)
  out = {'device': 'cpu', 'torch_threads': torch.get_num_threads(),
         'gpt': bench_gpt(a.gpt, a.batch, a.small, cfg=a.cfg)}
  if not a.skip_decoder:
    out['decoder'] = bench_decoder(a.batch, a.nfe, a.small)
    g, d = out['gpt'], out['decoder']
    jt = g['jax_s_per_image'] + d['jax_s_per_image_8nfe']
    tt = g['torch_s_per_image'] + d['torch_s_per_image_8nfe']
    out['total_s_per_image'] = {'jax': jt, 'torch': tt, 'ratio_jax_over_torch': jt / tt}
  print(json.dumps(out, indent=2))
  return out


if __name__ == '__main__':
  main()
