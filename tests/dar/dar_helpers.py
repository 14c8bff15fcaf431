"""Tiny D-AR pairs for the parity tests: a PyTorch reference with random non-zero weights
(reference/dar.py) and the JAX model converted from its saved state dict by the real converter.

Sizes keep the official structure (patch 16 encoder, 8x8 pixel patches, 64-d heads, groups of
ids, one decoder step per group) at toy scale: 64x64 images, 16 ids in 4 groups of 4.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

TINY_TOKENIZER = dict(image_size=64, patch_size=16, width=64, encoder_layers=2, decoder_layers=2,
                      num_queries=16, num_groups=4, queries_per_group=4, num_steps=4,
                      table_size=32, query_rank=8, vq_dim=8, codebook_size=64, flow_width=64,
                      flow_depth=2, flow_patch=8)
SETTINGS = dict(image_size=64, num_queries=16, num_groups=4, queries_per_group=4, num_steps=4)
TINY_GPT = dict(dim=128, n_layer=2, n_head=2, vocab=64, block_size=16, num_classes=10)
WORK = Path(tempfile.mkdtemp(prefix='dar-tests-'))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def tokenizer_pair(seed: int = 0):
  """Cached per seed (one conversion per process, however the seed is passed)."""
  return _tokenizer_pair(int(seed))


@functools.cache
def _tokenizer_pair(seed: int):
  """(torch reference tokenizer, TokenizerRunner of the converted JAX model, .pth path)."""
  import torch

  from disa_jax.systems.dar import TokenizerRunner, convert_tokenizer, load_tokenizer
  from reference import dar as ref

  t = TINY_TOKENIZER
  model = ref.Tokenizer(width=t['width'], patch=t['patch_size'], enc_layers=t['encoder_layers'],
                        dec_layers=t['decoder_layers'], queries=t['num_queries'],
                        groups=t['num_groups'], steps=t['num_steps'], vq_dim=t['vq_dim'],
                        codebook=t['codebook_size'], flow_width=t['flow_width'],
                        flow_depth=t['flow_depth'], flow_patch=t['flow_patch'],
                        table=t['table_size'])
  ref.randomize_(model, seed)
  model.eval()
  path = WORK / f'tokenizer{seed}.pth'
  torch.save({'ema': model.state_dict(), 'steps': 3}, path)
  out = convert_tokenizer(path, WORK / f'tokenizer{seed}', settings=SETTINGS)
  return model, TokenizerRunner(load_tokenizer(out), matmul_precision='highest'), path


def gpt_pair(seed: int = 0):
  """Cached per seed (one conversion per process, however the seed is passed)."""
  return _gpt_pair(int(seed))


@functools.cache
def _gpt_pair(seed: int):
  """(torch reference GPT, converted JAX GPT, .pth path)."""
  import torch

  from disa_jax.systems.dar import convert_gpt, load_gpt
  from reference import dar as ref

  model = ref.GPT(**TINY_GPT)
  ref.randomize_(model, seed + 100)
  model.eval()
  path = WORK / f'gpt{seed}.pth'
  torch.save({'model': {f'_orig_mod.{k}': v for k, v in model.state_dict().items()},
              'steps': 1}, path)
  out = convert_gpt(path, WORK / f'gpt{seed}', settings={'block_size': TINY_GPT['block_size']})
  return model, load_gpt(out), path


def images(batch: int, seed: int = 0, size: int = 64):
  """Smooth random images NHWC in [-1, 1] (and the NCHW torch copy)."""
  rng = np.random.default_rng(seed)
  x = np.tanh(rng.standard_normal((batch, size, size, 3)).astype(np.float32))
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def noise(batch: int, seed: int = 0, size: int = 64):
  rng = np.random.default_rng(seed + 1000)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  return x, np.ascontiguousarray(x.transpose(0, 3, 1, 2))
