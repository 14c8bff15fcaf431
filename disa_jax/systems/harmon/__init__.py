"""Harmon (+ DiSA): text-to-image with a Qwen2.5 trunk between MAR's encoder and decoder.

Public API:
  HarmonConfig, VARIANTS, tiny_config(), cpu_config(variant), harmon_config(variant, cpu, tiny)
  Harmon(config, rngs=, runtime=False); at_image_size(model, image_size=None) -> Harmon
  HarmonSampler(model, image_size=None, enc_bucket=0, prompt_bucket=16, max_head_waste=0.05,
                matmul_precision=None).generate(prompt_ids, key, uncond_ids=, steps=,
                max_timestep=None, cfg=3.0, cfg_schedule='constant', temperature=1.0,
                orders=None, noise=None, timed=False) -> tokens [B, L, C]
  convert(checkpoint, out, variant=None, dtype='float32', overwrite=False), load_harmon(dir),
  check(shapes), infer_config(shapes)
  harmon_flops(config, plan) -> per-component FLOPs (MAR encoder / LLM / MAR decoder / head)
"""

from disa_jax.systems.harmon.config import (
  VARIANTS,
  HarmonConfig,
  cpu_config,
  harmon_config,
  tiny_config,
)
from disa_jax.systems.harmon.convert import check, convert, infer_config, load_harmon
from disa_jax.systems.harmon.model import Harmon, at_image_size
from disa_jax.systems.harmon.sampler import HarmonSampler

__all__ = ['VARIANTS', 'Harmon', 'HarmonConfig', 'HarmonSampler', 'at_image_size', 'check',
           'convert', 'cpu_config', 'harmon_config', 'infer_config', 'load_harmon',
           'tiny_config']
