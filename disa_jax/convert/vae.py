"""`disa-convert vae`: the official KL-16 VAE (PyTorch) -> a disa_jax model directory.

  disa-convert vae --torch-checkpoint pretrained_models/vae/kl16.ckpt --out ckpt/kl16
  disa-convert vae --torch-checkpoint kl16.safetensors --out ckpt/kl16

`kl16.ckpt` is {'model': state_dict}; a .safetensors file is the state dict itself. The
architecture (base width, channel multipliers, blocks per level, encoder attention levels,
latent channels) is read off the tensor shapes; GroupNorm uses 32 groups as the official
model. Validation is strict (312 tensors for KL-16, every shape) and the output is written
atomically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from flax import nnx

from disa_jax.checkpoint import CheckpointError, save_model
from disa_jax.convert import source
from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict
from disa_jax.tokenizers.kl16 import AutoencoderKL, VAEConfig

ENTRIES = ('model', 'state_dict')


def convert(torch_checkpoint, out, *, weights: str = 'ema', variant: str | None = None,
            overwrite: bool = False, num_heads: int | None = None) -> Path:
  """Converts a KL-16 VAE checkpoint file into the model directory `out`; returns its path.

  `weights` is ignored (the VAE has one set of weights); `variant` and `num_heads` must be
  None (they describe MAR models).
  """
  del weights
  if variant is not None or num_heads is not None:
    flag = '--variant' if variant is not None else '--num-heads'
    raise CheckpointError(f'{flag} applies to `disa-convert mar` only; the VAE architecture '
                          'is read from the weights')
  out = source.check_output(out, overwrite)
  sd, entry = source.select_state_dict(torch_checkpoint, family='vae', entries=ENTRIES)
  cfg = infer_config(source.shapes_of(sd))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
  state = convert_state_dict(sd, abstract, what='KL-16 VAE')
  del sd
  vae = nnx.merge(graphdef, state)
  meta = {'source': str(Path(torch_checkpoint).expanduser().absolute()),
          'source_entry': entry, 'converted_by': 'disa-convert vae'}
  return save_model(out, vae, kind='vae', model_config=cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def check(shapes: Mapping[str, tuple]) -> VAEConfig:
  """Shape-only dry run of `convert`: the inferred config after strict key/shape validation."""
  cfg = infer_config(shapes)
  abstract = nnx.state(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
  check_state_dict(shapes, abstract, what='KL-16 VAE')
  return cfg


def _indices(shapes, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in shapes if (m := rx.fullmatch(k))})


def infer_config(shapes: Mapping[str, tuple]) -> VAEConfig:
  """VAEConfig from the torch shapes of an AutoencoderKL state dict."""
  for key in ('encoder.conv_in.weight', 'post_quant_conv.weight', 'decoder.conv_out.weight'):
    if key not in shapes:
      raise ConversionError(f'checkpoint does not match a KL-16 VAE: key {key} is missing')
  ch, in_channels = shapes['encoder.conv_in.weight'][:2]
  levels = _indices(shapes, r'encoder\.down\.(\d+)\.block\.0\.conv1\.weight')
  if levels != list(range(len(levels))) or not levels:
    raise ConversionError(f'checkpoint does not match a KL-16 VAE: encoder levels {levels}')
  ch_mult = []
  for i in levels:
    out_ch = shapes[f'encoder.down.{i}.block.0.conv1.weight'][0]
    if out_ch % ch:
      raise ConversionError(f'encoder.down.{i} has {out_ch} channels, not a multiple of {ch}')
    ch_mult.append(out_ch // ch)
  try:
    return VAEConfig(
      embed_dim=shapes['post_quant_conv.weight'][0], ch=ch, ch_mult=tuple(ch_mult),
      num_res_blocks=len(_indices(shapes, r'encoder\.down\.0\.block\.(\d+)\.conv1\.weight')),
      attn_levels=tuple(_indices(shapes, r'encoder\.down\.(\d+)\.attn\.0\.q\.weight')),
      in_channels=in_channels, out_ch=shapes['decoder.conv_out.weight'][0])
  except ValueError as e:
    raise ConversionError(f'checkpoint shapes give an invalid VAE architecture: {e}') from None
