"""FLOP model of FlowAR sampling, per scale, trunk vs flow head (multiply-add = 2 FLOPs).

Counts the matmuls of the official inference (`FlowAR_DiSA/models/flowar.py`, `flowmodel.py`,
`sampler.py`); norms, activations, softmax and RoPE are ignored (<1%). Per image; with CFG
(cfg != 1) every trunk pass and every head evaluation runs 2 rows per image, as the official
code (and this port) does.
Trunk, block s with n = n_s new tokens and M = end_s cached + new keys, per layer:
  qkv 6nD^2 + scores/values 4nMD + proj 2nD^2 + gated MLP 6nDF + adaLN 12D^2 (per row)
  plus z_proj 32nD and decoder_embed 2nD^2 per pass.
Head, per evaluation of n tokens (W width, F_h hidden, D trunk width):
  input_proj 32nW, time MLP 2(256W + W^2) per row, cond_embed 2nDW, final 4nW^2 + 32nW;
  v1 block: adaLN 12nW^2, self-attn 8nW^2 + 4n^2W, MLP 6nWF_h
  v2 block: adaLN 6W^2 (per row) + 6nW^2, self-attn 8nW^2 + 4n^2W,
            cross-attn q 2nW^2 + kv 4nDW + 4n^2W + proj 2nW^2, MLP 6nWF_h
"""

from __future__ import annotations

from collections.abc import Sequence

from disa_jax.diffusion.flow import num_evaluations
from disa_jax.systems.flowar.config import FlowARConfig


def trunk_pass_flops(cfg: FlowARConfig, s: int) -> float:
  """FLOPs of one trunk pass over block s for one row."""
  d, f = cfg.width, cfg.mlp_hidden
  n = cfg.scales[s] ** 2
  m = cfg.starts[s] + n
  layer = 6 * n * d * d + 4 * n * m * d + 2 * n * d * d + 6 * n * d * f + 12 * d * d
  extra = (32 * n * d if s > 0 else 0) + 2 * n * d * d
  return float(layer * (cfg.encoder_depth + cfg.decoder_depth) + extra)


def head_eval_flops(cfg: FlowARConfig, s: int) -> float:
  """FLOPs of one flow-head evaluation at scale s for one row."""
  w, d, f = cfg.head_width, cfg.width, cfg.head_mlp_hidden
  n = cfg.scales[s] ** 2
  base = 32 * n * w + 2 * (256 * w + w * w) + 2 * n * d * w + 4 * n * w * w + 32 * n * w
  attn = 8 * n * w * w + 4 * n * n * w
  if cfg.head_cross:
    block = 6 * w * w + 6 * n * w * w + attn + 4 * n * w * w + 4 * n * d * w + 4 * n * n * w \
      + 6 * n * w * f
  else:
    block = 12 * n * w * w + attn + 6 * n * w * f
  return float(base + cfg.head_depth * block)


def scale_flops(cfg: FlowARConfig, steps: Sequence[int], *, cfg_scale: float = 1.0,
                solver: str = 'euler') -> list[dict]:
  """Per scale: {'scale', 'tokens', 'evals', 'trunk', 'head'} FLOPs per image (evals of the
  flow `solver`: Euler N, Heun 2 N - 1 for N grid steps)."""
  rows = 2 if cfg_scale != 1.0 else 1
  out = []
  for s, req in enumerate(steps):
    evals = num_evaluations(int(req), solver)
    out.append({'scale': s, 'tokens': cfg.scales[s] ** 2, 'evals': evals,
                'trunk': rows * trunk_pass_flops(cfg, s),
                'head': rows * evals * head_eval_flops(cfg, s)})
  return out


def run_flops(cfg: FlowARConfig, steps: Sequence[int], *, cfg_scale: float = 1.0,
              solver: str = 'euler') -> dict:
  """Totals per image: {'trunk', 'head', 'total'} FLOPs."""
  per = scale_flops(cfg, steps, cfg_scale=cfg_scale, solver=solver)
  trunk = sum(p['trunk'] for p in per)
  head = sum(p['head'] for p in per)
  return {'trunk': trunk, 'head': head, 'total': trunk + head}
