"""`disa-convert mar`: official MAR-B/L/H PyTorch weights -> a disa_jax model directory.

  disa-convert mar --torch-checkpoint pretrained_models/mar/mar_base/checkpoint-last.pth \\
      --out ckpt/mar_base                       # EMA weights ('model_ema'), the default
  disa-convert mar --torch-checkpoint mar-large.safetensors --out ckpt/mar_large

The architecture is read off the tensor shapes (widths, depths, MLP ratio, head depth/width,
token dim, sequence length and class-token buffer from the position embeddings, class count);
the number of attention heads is not visible in the weights and comes from the variant
(`--variant`, or the width: 768 -> base (12 heads), 1024 -> large (16), 1280 -> huge (16)).
Validation is strict (every key, no extra key, every shape) and the output is written
atomically: nothing is written when anything is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from flax import nnx

from disa_jax.checkpoint import CheckpointError, save_model
from disa_jax.convert import source
from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.systems.mar.variants import MAR_VARIANTS

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
# Fixed settings of every official MAR (besides the per-variant widths/depths/head sizes).
OFFICIAL_FIXED = dict(img_size=256, vae_embed_dim=16, buffer_size=64, class_num=1000,
                      mlp_ratio=4.0)
ENTRIES = {'ema': 'model_ema', 'raw': 'model'}


def convert(torch_checkpoint, out, *, weights: str = 'ema', variant: str | None = None,
            overwrite: bool = False, num_heads: int | None = None) -> Path:
  """Converts a MAR checkpoint file into the model directory `out`; returns its path.

  weights: 'ema' ('model_ema', used for all reported results) or 'raw' ('model') of a
  training checkpoint (a bare state dict / safetensors file is used as it is).
  variant: 'base' | 'large' | 'huge' (checked against the shapes), or None to infer it.
  num_heads: attention heads for a non-official width (Python API / --num-heads).
  """
  if weights not in ENTRIES:
    raise CheckpointError(f'--weights must be ema or raw, got {weights!r}')
  out = source.check_output(out, overwrite)
  other = 'raw' if weights == 'ema' else 'ema'
  sd, entry = source.select_state_dict(
    torch_checkpoint, family='mar', entries=(ENTRIES[weights],),
    hints={ENTRIES[other]: f'pass --weights {other} to convert {ENTRIES[other]!r}'})
  shapes = source.shapes_of(sd)
  cfg, name = infer_config(shapes, variant=variant, num_heads=num_heads)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))
  state = convert_state_dict(sd, abstract, what=f'{name} model')
  del sd
  model = nnx.merge(graphdef, state)
  meta = {'variant': name, 'source': str(Path(torch_checkpoint).expanduser().absolute()),
          'source_entry': entry, 'weights': weights if entry else 'file',
          'converted_by': 'disa-convert mar'}
  return save_model(out, model, kind='mar', model_config=cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def check(shapes: Mapping[str, tuple], *, variant: str | None = None,
          num_heads: int | None = None) -> tuple[MARConfig, str]:
  """Shape-only dry run of `convert`: the inferred (config, variant name), after the same
  strict key/shape validation (nothing is allocated; used for the full-size tests)."""
  cfg, name = infer_config(shapes, variant=variant, num_heads=num_heads)
  abstract = nnx.state(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))
  check_state_dict(shapes, abstract, what=f'{name} model')
  return cfg, name


def _need(shapes, key, ndim: int):
  if key not in shapes:
    raise ConversionError(f'checkpoint does not match a MAR model: key {key} is missing')
  if len(shapes[key]) != ndim:
    raise ConversionError(f'checkpoint does not match a MAR model: {key} has shape '
                          f'{tuple(shapes[key])}, expected {ndim} dimensions')
  return shapes[key]


def _count(shapes, pattern: str) -> int:
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in shapes if (m := rx.fullmatch(k))}
  return max(idx) + 1 if idx else 0


def infer_config(shapes: Mapping[str, tuple], *, variant: str | None = None,
                 num_heads: int | None = None) -> tuple[MARConfig, str]:
  """(MARConfig, variant name) from the torch shapes of a MAR state dict.

  The name is 'mar_base' / 'mar_large' / 'mar_huge' when the shapes are exactly that
  official architecture, else 'mar_custom'.
  """
  if num_heads is not None and num_heads < 1:
    raise ConversionError(f'--num-heads must be >= 1, got {num_heads}')
  d, token_dim = _need(shapes, 'z_proj.weight', 2)
  dd = _need(shapes, 'decoder_embed.weight', 2)[0]
  seq = _need(shapes, 'diffusion_pos_embed_learned', 3)[1]
  buffer = _need(shapes, 'encoder_pos_embed_learned', 3)[1] - seq
  seq_h = math.isqrt(seq)
  if seq_h * seq_h != seq:
    raise ConversionError(f'diffusion_pos_embed_learned has {seq} positions, not a square grid')
  hidden = _need(shapes, 'encoder_blocks.0.mlp.fc1.weight', 2)[0]
  arch = dict(
    encoder_embed_dim=d, decoder_embed_dim=dd,
    encoder_depth=_count(shapes, r'encoder_blocks\.(\d+)\..*'),
    decoder_depth=_count(shapes, r'decoder_blocks\.(\d+)\..*'),
    diffloss_d=_count(shapes, r'diffloss\.net\.res_blocks\.(\d+)\..*'),
    diffloss_w=_need(shapes, 'diffloss.net.input_proj.weight', 2)[0],
    # Patch size 1 and the 16x downsampling VAE, as all official models: tokens are single
    # latent pixels, so the token dim is the VAE latent dim and img_size = 16 * grid.
    vae_embed_dim=token_dim, patch_size=1, vae_stride=16, img_size=16 * seq_h,
    buffer_size=buffer, class_num=_need(shapes, 'class_emb.weight', 2)[0],
    mlp_ratio=hidden / d)
  official = next((v for v, a in MAR_VARIANTS.items()
                   if all(arch[k] == a[k] for k in a if not k.endswith('num_heads'))
                   and all(arch[k] == v for k, v in OFFICIAL_FIXED.items())), None)
  if variant is not None:
    name = f'mar_{variant}' if not variant.startswith('mar_') else variant
    if name not in MAR_VARIANTS:
      raise CheckpointError(f'unknown --variant {variant!r}; choose base, large or huge')
    want = MAR_VARIANTS[name]
    diff = [f'{k} {arch[k]} (expected {want[k]})' for k in want
            if not k.endswith('num_heads') and arch[k] != want[k]]
    if diff:
      raise ConversionError(f'checkpoint is not {name}: {", ".join(diff)}; omit --variant to '
                            'infer the architecture from the weights')
    heads = (want['encoder_num_heads'], want['decoder_num_heads'])
  else:
    name = official or 'mar_custom'
    if num_heads:
      heads = (num_heads, num_heads)
    elif official:
      heads = (MAR_VARIANTS[official]['encoder_num_heads'],
               MAR_VARIANTS[official]['decoder_num_heads'])
    elif d in HEADS_BY_WIDTH and dd in HEADS_BY_WIDTH:
      heads = (HEADS_BY_WIDTH[d], HEADS_BY_WIDTH[dd])
    else:
      raise ConversionError(
        f'cannot infer the number of attention heads for width {d}/{dd} (official widths '
        f'768, 1024, 1280); pass --num-heads N')
  if num_heads and variant is not None and num_heads != heads[0]:
    raise ConversionError(f'--num-heads {num_heads} contradicts --variant {variant} '
                          f'({heads[0]} heads)')
  try:
    cfg = MARConfig(encoder_num_heads=heads[0], decoder_num_heads=heads[1], **arch)
  except ValueError as e:
    raise ConversionError(f'checkpoint shapes give an invalid MAR architecture: {e}') from None
  return cfg, name
