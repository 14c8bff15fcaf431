"""FLOP model of xAR sampling (counted multiply-adds x 2, per image, both CFG rows).

Official compute (spec §5.4, §6.5): every evaluation runs 2 rows per image ([x; x] with the
class and the null class, also in cell 0 and at cfg 1). For cell s with n_s evaluations:
  first pass   N = 64 (s = 0) or 128 query tokens ([clean cell s-1 ; noisy cell s])
  later passes N = 64 query tokens
and in every pass the keys are the 64 (s + 1) tokens of cells 0..s. Per pass and row, with
width D, MLP hidden F, L = encoder + decoder layers and C = N / 64 cell conditions:
  per layer:   N (2 * 3 D^2 [qkv] + 2 D^2 [proj] + 2 * 3 D F [gated MLP] + 2 * 2 M D [attention])
               + C * 2 * 6 D^2 [adaLN, once per cell]
  outside:     N (2 * 16 D [z_proj] + 2 D^2 [decoder_embed] + 2 * 16 D [pred])
               + C * 2 (256 D + D^2) [time embedding]
Norms, RoPE, softmax and the SDE update are elementwise and left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from disa_jax.systems.xar.config import XARConfig


def pass_flops(cfg: XARConfig, queries: int, keys: int) -> float:
  """FLOPs of one network pass for one row: `queries` tokens against `keys` keys."""
  d, f = cfg.width, cfg.mlp_hidden
  layers = cfg.encoder_depth + cfg.decoder_depth
  conds = queries // cfg.cell_tokens
  per_layer = queries * (6 * d * d + 2 * d * d + 6 * d * f + 4 * keys * d) + conds * 12 * d * d
  outside = queries * (2 * cfg.token_dim * d * 2 + 2 * d * d) + conds * 2 * (256 * d + d * d)
  return float(layers * per_layer + outside)


def cell_flops(cfg: XARConfig, s: int, num_evals: int) -> float:
  """FLOPs of cell s with `num_evals` evaluations, per image (2 rows)."""
  n = cfg.cell_tokens
  keys = n * (s + 1)
  first = pass_flops(cfg, n if s == 0 else 2 * n, keys)
  return 2.0 * (first + (num_evals - 1) * pass_flops(cfg, n, keys))


def run_flops(cfg: XARConfig, steps: Sequence[int]) -> dict:
  """{'per_cell': [...], 'total': ..., 'evaluations': ..., 'tokens': ...} per image."""
  per_cell = [cell_flops(cfg, s, int(n)) for s, n in enumerate(steps)]
  tokens = sum(int(n) * cfg.cell_tokens + (cfg.cell_tokens if s else 0)
               for s, n in enumerate(steps))
  return {'per_cell': per_cell, 'total': float(sum(per_cell)),
          'evaluations': int(sum(int(n) for n in steps)), 'tokens': tokens}


def predicted_speedup(cfg: XARConfig, baseline: Sequence[int], disa: Sequence[int]) -> float:
  """FLOP ratio baseline / DiSA."""
  return run_flops(cfg, baseline)['total'] / run_flops(cfg, disa)['total']
