"""Strict converter: official FlowAR checkpoints (`FlowAR-{S,L,H}.pth`, safetensors) -> nnx state.

Official format (spec §7): a flat float32 state dict (no 'model' wrapper) including the buffers
`mask` (1, 1, L, L) and `*.rope.freqs` (hd / 4,). Training checkpoints {'model', 'model_ema', ...}
are accepted too ('model_ema' by default). The architecture is read off the shapes:
  width D = class_emb.weight[1], classes = class_emb.weight[0] - 1, encoder / decoder depth =
  number of blocks, trunk heads = D / (4 * len(encoder_blocks.0.attn.rope.freqs)), flow head
  width / depth from flownet.input_proj / res_blocks, head block v2 iff `crossattn` keys exist,
  scales from the position tables (1, 2, 4, ... with sum of squares = L).
Every key is checked: missing, unexpected and misshaped keys, non-floating dtypes and
non-finite values are errors (`FlowARConversionError`, one line); buffers must equal the values
recomputed here (mask exactly, RoPE frequencies to 1e-6). Linear weights are transposed into
(in, out) kernels; nothing is written unless everything matches (`disa_jax.checkpoint`'s atomic
model directory).
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
from disa_jax.systems.flowar.config import FlowARConfig
from disa_jax.systems.flowar.model import FlowAR, block_causal_mask

ENTRIES = ('model_ema', 'model')


class FlowARConversionError(ConversionError):
  """The weights file does not hold a valid FlowAR state dict; one line says what is wrong."""


def _fail(msg: str):
  raise FlowARConversionError(' '.join(msg.split()))


def read_state_dict(path, *, weights: str = 'ema') -> dict[str, np.ndarray]:
  """The raw state dict of a weights file, dtypes preserved (safe loaders only). A training
  checkpoint's 'model_ema' is read for weights='ema' ('model' when it has no EMA), its
  'model' for weights='raw'."""
  return read_official_state_dict(path, weights=weights, system='FlowAR', fail=_fail,
                                  ema_entries=ENTRIES, raw_entries=('model',))


def _need(shapes, key):
  return need(shapes, key, system='a FlowAR', fail=_fail)


_count = count_indexed


def infer_config(shapes: Mapping[str, tuple]) -> FlowARConfig:
  """The architecture from the tensor shapes of an official state dict."""
  rows, width = _need(shapes, 'class_emb.weight')
  seq = _need(shapes, 'encoder_pos_embed_learned')[1]
  scales, acc, side = [], 0, 1
  while acc < seq:
    scales.append(side)
    acc += side * side
    side *= 2
  if acc != seq:
    _fail(f'position tables have {seq} rows, which is not 1 + 4 + 16 + ... (FlowAR scales)')
  freqs = _need(shapes, 'encoder_blocks.0.attn.rope.freqs')[0]
  if freqs == 0 or width % (4 * freqs):
    _fail(f'encoder_blocks.0.attn.rope.freqs has {freqs} entries, inconsistent with width {width}')
  head_width = _need(shapes, 'flownet.input_proj.weight')[0]
  token_dim = shapes['flownet.input_proj.weight'][1]
  hidden = _need(shapes, 'encoder_blocks.0.mlp.fc1_g.weight')[0]
  ratio = hidden * 3 / (2 * width)
  try:
    cfg = FlowARConfig(
      width=width, encoder_depth=_count(shapes, 'encoder_blocks.'),
      decoder_depth=_count(shapes, 'decoder_blocks.'), heads=width // (4 * freqs),
      head_width=head_width, head_depth=_count(shapes, 'flownet.res_blocks.'),
      head_cross=any('.crossattn.' in k for k in shapes), scales=tuple(scales),
      token_dim=token_dim, class_num=rows - 1, mlp_ratio=4.0)
  except UserError as e:
    _fail(f'checkpoint shapes give an invalid FlowAR architecture: {e}')
  if cfg.mlp_hidden != hidden:
    _fail(f'MLP hidden width {hidden} is not int(8 * {width} / 3) = {cfg.mlp_hidden} '
          f'(mlp ratio {ratio:.3f}, the official models use 4)')
  return cfg


def _is_buffer(key: str) -> bool:
  return key == 'mask' or key.endswith('.rope.freqs')


def expected_buffers(cfg: FlowARConfig) -> dict[str, np.ndarray]:
  """The buffers an official state dict holds, recomputed: `mask` and every `rope.freqs`."""
  expected = {'mask': np.where(block_causal_mask(cfg.scales), 0.0, -np.inf)[None, None]
              .astype(np.float32)}
  for prefix, n in (('encoder_blocks', cfg.encoder_depth), ('decoder_blocks', cfg.decoder_depth)):
    for i in range(n):
      expected[f'{prefix}.{i}.attn.rope.freqs'] = rope_freqs(cfg.head_dim)
  for i in range(cfg.head_depth):
    expected[f'flownet.res_blocks.{i}.attn.rope.freqs'] = rope_freqs(64)
    if cfg.head_cross:
      expected[f'flownet.res_blocks.{i}.crossattn.rope.freqs'] = rope_freqs(64)
  return expected


def _buffer_matches(key: str, got: np.ndarray, want: np.ndarray) -> bool:
  """The mask exactly, RoPE frequencies to 1e-6 relative."""
  return (np.array_equal(got, want) if key == 'mask'
          else np.allclose(got, want, rtol=1e-6, atol=0))


CONVERTER = BufferedConverter(label='FlowAR', kind='flowar', model_cls=FlowAR, fail=_fail,
                              infer_config=infer_config, is_buffer=_is_buffer,
                              expected_buffers=expected_buffers,
                              buffer_matches=_buffer_matches)


def check_shapes(shapes: Mapping[str, tuple]) -> FlowARConfig:
  """Shape-only dry run of the conversion (nothing allocated): the inferred config after the
  same strict key / shape validation (used for the full-size S / L / H key listings)."""
  return CONVERTER.check_shapes(shapes)


def check_values(sd: Mapping[str, np.ndarray]):
  """dtype (floating) and finiteness of every parameter (buffers: mask may hold -inf)."""
  CONVERTER.check_values(sd)


def convert_state(sd: Mapping[str, np.ndarray]) -> tuple[FlowARConfig, object, object]:
  """(config, graphdef, filled nnx state) from an official state dict; strict."""
  return CONVERTER.convert_state(sd)


def load_converted(path) -> FlowAR:
  """An nnx FlowAR model from an official weights file (nothing written)."""
  _, graphdef, state = convert_state(read_state_dict(path))
  return nnx.merge(graphdef, state)


def convert(torch_checkpoint, out, *, overwrite: bool = False, variant: str | None = None,
            weights: str = 'ema') -> Path:
  """`disa-convert flowar`: weights file -> model directory `out` (written atomically)."""
  from disa_jax.systems.flowar.config import variant as official
  from disa_jax.systems.flowar.io import save_flowar

  return CONVERTER.convert(torch_checkpoint, out, overwrite=overwrite, variant=variant,
                           state_dict=lambda: read_state_dict(torch_checkpoint, weights=weights),
                           official=official, save=save_flowar, error=FlowARConversionError)
