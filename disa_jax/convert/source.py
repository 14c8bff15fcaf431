"""Choosing the state dict to convert from an official weights file, and recognising which
model family a state dict belongs to (so a VAE file given to `disa-convert mar` says so).

Official files: MAR-B/L/H `checkpoint-last.pth` = {'model', 'model_ema'} (a training
checkpoint may add 'optimizer', 'epoch', 'scaler', 'args'); KL-16 `kl16.ckpt` = {'model'};
the community `mar-*.safetensors` / `kl16.safetensors` are single state dicts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from disa_jax.checkpoint import CheckpointError
from disa_jax.convert.mapping import ConversionError
from disa_jax.convert.torch_io import load_checkpoint

# Key patterns that identify each family (a key matches if it starts with one of them).
FAMILIES = {
  'mar': ('fake_latent', 'encoder_pos_embed_learned', 'encoder_blocks.', 'decoder_blocks.',
          'diffloss.net.', 'z_proj.'),
  'vae': ('encoder.conv_in.', 'encoder.down.', 'decoder.up.', 'decoder.conv_in.',
          'post_quant_conv.', 'quant_conv.'),
  'inception': ('Conv2d_1a_3x3.', 'Mixed_5b.', 'Mixed_7c.'),
}
DESCRIPTION = {'mar': 'a MAR model', 'vae': 'a KL-16 VAE', 'inception': 'an Inception-v3 (FID)'}


def detect_family(keys) -> str | None:
  """'mar', 'vae' or 'inception' from the key names of a state dict, or None."""
  keys = list(keys)
  scores = {fam: sum(any(k.startswith(p) for p in pats) for k in keys)
            for fam, pats in FAMILIES.items()}
  best = max(scores, key=scores.get)
  return best if scores[best] else None


def check_output(out, overwrite: bool) -> Path:
  """Fails before any (slow) reading if `out` exists and --overwrite was not given."""
  out = Path(out).expanduser()
  if out.exists() and not overwrite:
    raise CheckpointError(f'output {out} already exists; choose another --out or pass '
                          '--overwrite')
  if out.exists() and not (out / 'meta.json').exists():
    raise CheckpointError(f'refusing to overwrite {out}: it is not a disa_jax model directory')
  return out


def select_state_dict(path, *, family: str, entries: tuple[str, ...],
                      hints: Mapping[str, str] | None = None
                      ) -> tuple[dict[str, np.ndarray], str]:
  """(state dict, entry used) of `family` from the weights file at `path`.

  A bare state dict (or .safetensors) is used as it is (entry ''); otherwise the first of
  `entries` present. Errors name the problem: no such entry (listing those present, plus
  `hints[e]` for each present entry e), or a state dict of another family (naming the
  subcommand to use).
  """
  found = load_checkpoint(path)
  name = os.fspath(path)
  if '' in found:
    sd, used = found[''], ''
  else:
    used = next((e for e in entries if e in found), None)
    if used is None:
      _check_family(name, next(iter(found.values())), family)   # a wrong file says so first
      have = ', '.join(repr(e) for e in found)
      want = ' or '.join(repr(e) for e in entries)
      hint = ''.join(f'; {h}' for e, h in (hints or {}).items() if e in found)
      raise CheckpointError(f'{name} has no {want} entry (it holds {have}){hint}')
    sd = found[used]
  _check_family(name, sd, family)
  return sd, used


def _check_family(name: str, sd: Mapping, family: str) -> None:
  got = detect_family(sd)
  if got == family:
    return
  if got is None:
    shown = ', '.join(list(sd)[:5])
    raise ConversionError(
      f'{name} is not {DESCRIPTION[family]} checkpoint: none of its {len(sd)} keys looks like '
      f'one (first keys: {shown})')
  raise ConversionError(
    f'{name} holds {DESCRIPTION[got]}, not {DESCRIPTION[family]}; convert it with '
    f'`disa-convert {got} --torch-checkpoint {name} --out DIR`')


def shapes_of(sd: Mapping) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in sd.items()}
