"""MAR's FLOP model (multiply-adds x 2), counted from the model shapes (`disa-bench`).

Per image and CFG branch: the backbone pass at each AR step (encoder over buffer + visible
tokens, decoder over buffer + L positions) and the head's evaluations (rows x steps).
"""

from __future__ import annotations

from disa_jax.systems.mar.model import MARConfig
from disa_jax.systems.mar.plan import SamplingPlan


def block_flops(rows_q: int, rows_kv: int, dim: int, mlp_ratio: float) -> float:
  hidden = int(dim * mlp_ratio)
  proj = 2 * rows_q * dim * dim + 2 * rows_kv * dim * 2 * dim  # q + kv projections
  attn = 2 * 2 * rows_q * rows_kv * dim                        # scores + weighted sum
  out = 2 * rows_q * dim * dim + 2 * 2 * rows_q * dim * hidden
  return proj + attn + out


def backbone_flops(config: MARConfig, visible: int, n_query: int | None = None) -> float:
  """FLOPs of one encoder+decoder pass for one sequence (one image, one CFG branch).

  The encoder sees buffer + `visible` tokens; the decoder all buffer + L positions, its last
  block queries only `n_query` rows when given (None: all L, as the official code).
  """
  c = config
  nb, seq = c.buffer_size, c.seq_len
  le, ld = nb + visible, nb + seq
  f = 2 * visible * c.token_embed_dim * c.encoder_embed_dim
  f += c.encoder_depth * block_flops(le, le, c.encoder_embed_dim, c.mlp_ratio)
  f += 2 * le * c.encoder_embed_dim * c.decoder_embed_dim
  f += (c.decoder_depth - 1) * block_flops(ld, ld, c.decoder_embed_dim, c.mlp_ratio)
  nq = seq if n_query is None else n_query
  f += block_flops(nq if n_query is not None else ld, ld, c.decoder_embed_dim, c.mlp_ratio)
  return float(f)


def head_flops_per_eval(config: MARConfig) -> float:
  """FLOPs of one head evaluation of one token row (official: time+cond embed every step)."""
  c = config
  w, ch, dd = c.diffloss_w, c.token_embed_dim, c.decoder_embed_dim
  per = 2 * (256 * w + w * w)            # time embedding MLP
  per += 2 * dd * w + 2 * ch * w         # cond_embed, input_proj
  per += c.diffloss_d * 2 * (2 * w * w + 3 * w * w)
  per += 2 * (2 * w * w + w * 2 * ch)    # final adaLN + linear
  return float(per)


def head_trunk_flops(config: MARConfig) -> float:
  """FLOPs of the head trunk for one row and step: input projection, every block (adaLN
  modulation + MLP), final layer."""
  c = config
  w, ch = c.diffloss_w, c.token_embed_dim
  return float(2 * ch * w + c.diffloss_d * 2 * (5 * w * w) + 2 * (2 * w * w + w * 2 * ch))


def head_flops_call(config: MARConfig, rows: int, num_steps: int) -> float:
  """FLOPs this sampler's head call runs for `rows` rows (all branches) and A steps: the time
  embedding once per step, the condition embedding once per row, the trunk per row-step."""
  c = config
  w, dd = c.diffloss_w, c.decoder_embed_dim
  return float(num_steps * 2 * (256 * w + w * w) + rows * 2 * dd * w
               + rows * num_steps * head_trunk_flops(c))


def plan_flops(config: MARConfig, plan: SamplingPlan, *, official: bool = True) -> dict:
  """Counted FLOPs per image: `official=True` counts what the reference computes (useful rows,
  full decoder); False counts what this sampler runs (padded rows, partial last block)."""
  branches = 2 if plan.use_cfg else 1
  bb = hd = 0.0
  for s in plan.steps:
    if official:
      bb += backbone_flops(config, s.visible)
      hd += s.n_pred * s.actual_steps * head_flops_per_eval(config)
    else:
      bb += backbone_flops(config, s.visible_pad, n_query=plan.n_query)
      hd += head_flops_call(config, branches * s.n_pad, s.actual_steps) / branches
  return {'backbone': bb * branches, 'head': hd * branches, 'total': (bb + hd) * branches}
