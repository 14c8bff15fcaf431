"""Harmon (+ DiSA): text-to-image with a Qwen2.5 trunk between MAR's encoder and decoder.

`SYSTEM` (`system.py`) wires Harmon into the shared commands (`disa-sample`, `disa-bench`,
`disa-convert harmon`); `flags.py` holds its own flags (--prompt, --prompts_file, --tokenizer).
The package import is light (the commands import it before flags are parsed); the public API
below is imported on first use:
  HarmonConfig, VARIANTS, tiny_config(), cpu_config(variant), harmon_config(variant, cpu, tiny)
  Harmon(config, rngs=, runtime=False); at_image_size(model, image_size=None) -> Harmon
  HarmonSampler(model, image_size=None, enc_bucket=0, prompt_bucket=16, max_head_waste=0.05,
                matmul_precision=None, mesh=None).generate(prompt_ids, key, uncond_ids=,
                steps=, max_timestep=None, cfg=3.0, cfg_schedule='constant', temperature=1.0,
                image_ids=None, progress=None, orders=None, noise=None, timed=False)
                -> tokens [B, L, C]
  convert(checkpoint, out, variant=None, dtype='float32', overwrite=False), load_harmon(dir),
  check(shapes), infer_config(shapes)
  harmon_flops(config, plan) -> per-component FLOPs (MAR encoder / LLM / MAR decoder / head)
"""

import importlib

from disa_jax.systems.harmon.system import SYSTEM

_LAZY = {
  'VARIANTS': 'config', 'HarmonConfig': 'config', 'cpu_config': 'config',
  'harmon_config': 'config', 'tiny_config': 'config', 'check': 'convert', 'convert': 'convert',
  'infer_config': 'convert', 'load_harmon': 'convert', 'Harmon': 'model',
  'at_image_size': 'model', 'HarmonSampler': 'sampler', 'harmon_flops': 'flops',
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f'disa_jax.systems.harmon.{_LAZY[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['SYSTEM', *sorted(_LAZY)]
