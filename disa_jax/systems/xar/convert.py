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
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.checkpoint import CheckpointError
from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict
from disa_jax.convert.state_dict import count_indexed, need, read_official_state_dict
from disa_jax.errors import UserError
from disa_jax.layers.rope import rope_freqs
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


def _check_buffer_shapes(shapes: Mapping[str, tuple], expected: Mapping[str, np.ndarray]):
  have = {k for k in shapes if _is_buffer(k)}
  missing = sorted(set(expected) - have)
  extra = sorted(have - set(expected))
  if missing:
    _fail(f'checkpoint does not match the xAR model: {len(missing)} missing buffer(s): '
          f'{", ".join(missing[:6])}')
  if extra:
    _fail(f'checkpoint does not match the xAR model: {len(extra)} unexpected key(s): '
          f'{", ".join(extra[:6])}')
  for k, want in expected.items():
    if tuple(shapes[k]) != want.shape:
      _fail(f'checkpoint does not match the xAR model: {k} has shape {tuple(shapes[k])}, '
            f'expected {want.shape}')


def _check_buffer_values(sd: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]):
  for k, want in expected.items():
    got = np.asarray(sd[k])
    if k == 'mask':
      ok = np.array_equal(got, want)
    elif k.endswith('.rope.freqs'):
      ok = np.allclose(got, want, rtol=1e-6, atol=0)
    else:
      ok = np.allclose(got, want, rtol=0, atol=1e-5)
    if not ok:
      _fail(f'buffer {k} differs from the value xAR computes; the file is not an official xAR '
            'checkpoint (or was edited)')


def _abstract(cfg: XARConfig):
  return nnx.split(nnx.eval_shape(lambda: XAR(cfg, rngs=nnx.Rngs(0))))


def check_shapes(shapes: Mapping[str, tuple]) -> XARConfig:
  """Shape-only dry run of the conversion (nothing allocated): the inferred config after the
  same strict key / shape validation (used for the full-size B / L / H key listings)."""
  shapes = {k: tuple(v) for k, v in shapes.items()}
  cfg = infer_config(shapes)
  _check_buffer_shapes(shapes, expected_buffers(cfg))
  try:
    check_state_dict({k: v for k, v in shapes.items() if not _is_buffer(k)}, _abstract(cfg)[1],
                     what='xAR model')
  except ConversionError as e:
    _fail(str(e).replace('\n', ' '))
  return cfg


def check_values(sd: Mapping[str, np.ndarray]):
  """dtype (floating) and finiteness of every entry (the mask may hold -inf)."""
  for k, v in sd.items():
    v = np.asarray(v)
    if not np.issubdtype(v.dtype, np.floating):
      _fail(f'checkpoint key {k} has dtype {v.dtype}; xAR weights must be floating point '
            '(float32 as saved officially)')
    if k != 'mask' and not np.all(np.isfinite(v)):
      _fail(f'checkpoint key {k} contains non-finite values (NaN/inf); the file is corrupt')


def convert_state(sd: Mapping[str, np.ndarray]) -> tuple[XARConfig, object, object]:
  """(config, graphdef, filled nnx state) from an official state dict; strict."""
  shapes = {k: tuple(np.shape(v)) for k, v in sd.items()}
  check_values(sd)
  cfg = infer_config(shapes)
  graphdef, abstract = _abstract(cfg)
  expected = expected_buffers(cfg)
  _check_buffer_shapes(shapes, expected)
  _check_buffer_values(sd, expected)
  params = {k: np.asarray(v, np.float32) for k, v in sd.items() if not _is_buffer(k)}
  try:
    state = convert_state_dict(params, abstract, what='xAR model')
  except ConversionError as e:
    _fail(str(e).replace('\n', ' '))
  return cfg, graphdef, state


def load_converted(path) -> XAR:
  """An nnx xAR model from an official weights file (nothing written)."""
  _, graphdef, state = convert_state(read_state_dict(path))
  return nnx.merge(graphdef, state)


def convert(torch_checkpoint, out, *, overwrite: bool = False, variant: str | None = None,
            weights: str = 'ema', **_flags) -> Path:
  """`disa-convert xar`: weights file -> model directory `out` (written atomically)."""
  from disa_jax.convert.source import check_output
  from disa_jax.systems.xar.io import save_xar

  try:
    out = check_output(out, overwrite)
  except CheckpointError as e:
    raise XARConversionError(str(e)) from None
  cfg, graphdef, state = convert_state(read_state_dict(torch_checkpoint, weights))
  if variant:
    from disa_jax.systems.xar.config import variant as official
    want = official(variant)
    if want != cfg:
      _fail(f'checkpoint shapes give {cfg}, not xAR-{variant.upper()}; drop --variant or pass '
            'the matching file')
  meta = {'source': str(Path(torch_checkpoint).expanduser().absolute()),
          'converted_by': 'disa-convert xar'}
  return save_xar(out, nnx.merge(graphdef, state), meta=meta, overwrite=overwrite)
