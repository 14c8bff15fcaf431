"""Strict converter: official xAR checkpoints (`xAR-{B,L,H}.pth`, safetensors) -> nnx state.

Official format (spec §7): a flat float32 state dict (no wrapper) including the buffers `mask`
(1, 1, 256, 256) (cell-causal, 0 / -inf), `*.rope.freqs` (hd / 4,) and the cell-permuted RoPE
tables `*.rope.freqs_cos / freqs_sin` (256, hd). Training checkpoints {'model', 'model_ema', ...}
are accepted too ('model_ema' by default). The architecture is read off the shapes:
  width D = class_emb.weight[1], classes = class_emb.weight[0] - 1, encoder / decoder depth =
  number of blocks, heads = D / (4 * len(encoder_blocks.0.attn.rope.freqs)), token channels =
  z_proj.weight[1], MLP hidden = int(8 D / 3) checked, 256 positions (16x16 grid of 8x8 cells).
Every key is checked: missing, unexpected and misshaped keys, non-floating dtypes and non-finite
values are errors (`XARConversionError`, one line); buffers must equal the values recomputed
here (mask exactly, frequencies to 1e-6 relative, cos / sin tables to 1e-5 absolute). Linear
weights become (in, out) kernels; nothing is written unless everything matches (the atomic
model directory of `disa_jax.checkpoint`).
The checks run in `systems/common/convert.BufferedConverter`; the key rules above stay here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.convert.mapping import ConversionError
from disa_jax.convert.state_dict import count_indexed, need, read_official_state_dict
from disa_jax.errors import UserError
from disa_jax.layers.rope import rope_freqs
from disa_jax.systems.common.convert import BufferedConverter
from disa_jax.systems.xar.config import XARConfig
from disa_jax.systems.xar.model import XAR, cell_causal_mask, cell_rope_table

ENTRIES = ('model_ema', 'model')
BUFFER_SUFFIXES = ('.rope.freqs', '.rope.freqs_cos', '.rope.freqs_sin')


class XARConversionError(ConversionError):
  """The weights file does not hold a valid xAR state dict; one line says what is wrong."""


def _fail(msg: str):
  raise XARConversionError(' '.join(msg.split()))


def read_state_dict(path, weights: str = 'ema') -> dict[str, np.ndarray]:
  """The raw state dict of a weights file, dtypes preserved (safe loaders only); of a training
  checkpoint the 'model_ema' entry (weights='ema') or 'model' (weights='raw')."""
  return read_official_state_dict(path, weights=weights, system='xAR', fail=_fail,
                                  ema_entries=ENTRIES, raw_entries=('model', 'model_ema'))


def _need(shapes, key):
  return need(shapes, key, system='an xAR', fail=_fail)


_count = count_indexed


def infer_config(shapes: Mapping[str, tuple]) -> XARConfig:
  """The architecture from the tensor shapes of an official state dict."""
  if 'flownet.input_proj.weight' in shapes:
    _fail('checkpoint holds a FlowAR model (flownet.* keys), not xAR; use `disa-convert flowar`')
  rows, width = _need(shapes, 'class_emb.weight')
  seq = _need(shapes, 'encoder_pos_embed_learned')[1]
  if seq != 256:
    _fail(f'position tables have {seq} rows; xAR uses the 16x16 grid (256 tokens)')
  freqs = _need(shapes, 'encoder_blocks.0.attn.rope.freqs')[0]
  if freqs == 0 or width % (4 * freqs):
    _fail(f'encoder_blocks.0.attn.rope.freqs has {freqs} entries, inconsistent with width {width}')
  token_dim = _need(shapes, 'z_proj.weight')[1]
  hidden = _need(shapes, 'encoder_blocks.0.mlp.fc1_g.weight')[0]
  try:
    cfg = XARConfig(width=width, encoder_depth=_count(shapes, 'encoder_blocks.'),
                    decoder_depth=_count(shapes, 'decoder_blocks.'), heads=width // (4 * freqs),
                    token_dim=token_dim, class_num=rows - 1)
  except UserError as e:
    _fail(f'checkpoint shapes give an invalid xAR architecture: {e}')
  if cfg.mlp_hidden != hidden:
    _fail(f'MLP hidden width {hidden} is not int(8 * {width} / 3) = {cfg.mlp_hidden} '
          '(the official models use mlp ratio 4)')
  return cfg


def _is_buffer(key: str) -> bool:
  return key == 'mask' or key.endswith(BUFFER_SUFFIXES)


def expected_buffers(cfg: XARConfig) -> dict[str, np.ndarray]:
  """The buffers an official state dict holds, recomputed."""
  expected = {'mask': np.where(cell_causal_mask(cfg), 0.0, -np.inf)[None, None]
              .astype(np.float32)}
  cos, sin = cell_rope_table(cfg)
  freqs = rope_freqs(cfg.head_dim)
  for prefix, n in (('encoder_blocks', cfg.encoder_depth), ('decoder_blocks', cfg.decoder_depth)):
    for i in range(n):
      expected[f'{prefix}.{i}.attn.rope.freqs'] = freqs
      expected[f'{prefix}.{i}.attn.rope.freqs_cos'] = cos
      expected[f'{prefix}.{i}.attn.rope.freqs_sin'] = sin
  return expected


def _buffer_matches(key: str, got: np.ndarray, want: np.ndarray) -> bool:
  """The mask exactly, frequencies to 1e-6 relative, cos / sin tables to 1e-5 absolute."""
  if key == 'mask':
    return np.array_equal(got, want)
  if key.endswith('.rope.freqs'):
    return np.allclose(got, want, rtol=1e-6, atol=0)
  return np.allclose(got, want, rtol=0, atol=1e-5)


CONVERTER = BufferedConverter(label='xAR', kind='xar', model_cls=XAR, fail=_fail,
                              infer_config=infer_config, is_buffer=_is_buffer,
                              expected_buffers=expected_buffers,
                              buffer_matches=_buffer_matches)


def check_shapes(shapes: Mapping[str, tuple]) -> XARConfig:
  """Shape-only dry run of the conversion (nothing allocated): the inferred config after the
  same strict key / shape validation (used for the full-size B / L / H key listings)."""
  return CONVERTER.check_shapes(shapes)


def check_values(sd: Mapping[str, np.ndarray]):
  """dtype (floating) and finiteness of every entry (the mask may hold -inf)."""
  CONVERTER.check_values(sd)


def convert_state(sd: Mapping[str, np.ndarray]) -> tuple[XARConfig, object, object]:
  """(config, graphdef, filled nnx state) from an official state dict; strict."""
  return CONVERTER.convert_state(sd)


def load_converted(path) -> XAR:
  """An nnx xAR model from an official weights file (nothing written)."""
  _, graphdef, state = convert_state(read_state_dict(path))
  return nnx.merge(graphdef, state)


def convert(torch_checkpoint, out, *, overwrite: bool = False, variant: str | None = None,
            weights: str = 'ema', **_flags) -> Path:
  """`disa-convert xar`: weights file -> model directory `out` (written atomically)."""
  from disa_jax.systems.xar.config import variant as official
  from disa_jax.systems.xar.io import save_xar

  return CONVERTER.convert(torch_checkpoint, out, overwrite=overwrite, variant=variant or None,
                           state_dict=lambda: read_state_dict(torch_checkpoint, weights),
                           official=official, save=save_xar, error=XARConversionError)
