"""FLOP model of Harmon sampling (2 FLOPs per multiply-add), split MAR encoder / LLM /
projections / MAR decoder / head; shared/spec/harmon.md §5.2 gives the official figures
(0.5B per image: LLM 39.3 + 1.7 T, encoder 9.3 + 1.3, decoder 23.7 + 5.6, proj 0.3, head 14.6).

Per MAR iteration s and LLM row r (cond prompt of v_c valid tokens, uncond of v_u):
  encoder   nb + V_s tokens (official: compact; this sampler: nb + V_pad)
  LLM       nb + V_s segment tokens through every layer; attention keys v_r + nb + V_s
            (the official eager / SDPA kernels compute the full masked score matrix)
  decoder   nb + L positions (this sampler: the last block only at `n_query` rows)
  head      n_s tokens x A(T(s)) steps, 2 net rows per token under CFG
plus one prompt prefill per row. Attention FLOPs are included in each component.
"""

from __future__ import annotations

from disa_jax.layers.qwen2 import Qwen2Config
from disa_jax.systems.harmon.config import HarmonConfig
from disa_jax.systems.mar.flops import block_flops, head_flops_call, head_flops_per_eval
from disa_jax.systems.mar.plan import SamplingPlan


def llm_flops(c: Qwen2Config, tokens: int, keys: int) -> float:
  """One Qwen2 forward of `tokens` queries over `keys` keys (one row)."""
  hd, nh, nkv, h = c.hd, c.num_attention_heads, c.num_key_value_heads, c.hidden_size
  linear = 2 * tokens * (h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * c.intermediate_size)
  attn = 2 * 2 * tokens * keys * nh * hd
  return float(c.num_hidden_layers * (linear + attn))


def harmon_flops(config: HarmonConfig, plan: SamplingPlan, *, prompt_len: int = 24,
                 uncond_len: int = 12, padded_prompt: int | None = None,
                 official: bool = True) -> dict:
  """FLOPs per image by component. `official=True`: what the official code computes (compact
  lengths, full decoder); False: what `HarmonSampler` runs (bucket padding, `padded_prompt`
  prompt slots, decoder last block at the query rows only, padded head rows)."""
  mar = config.runtime_mar
  llm = config.llm
  nb, seq, d, dd = mar.buffer_size, mar.seq_len, mar.encoder_embed_dim, mar.decoder_embed_dim
  h = llm.hidden_size
  rows = [prompt_len] + ([uncond_len] if plan.use_cfg else [])
  lp = padded_prompt or max(rows)
  out = dict(encoder=0.0, llm=0.0, proj=0.0, decoder=0.0, head=0.0)
  for v in rows:
    out['llm'] += llm_flops(llm, lp if not official else v, lp if not official else v)
  branches = len(rows)
  for s in plan.steps:
    vis = s.visible if official else s.visible_pad
    le = nb + vis
    enc = 2 * vis * mar.token_embed_dim * d + mar.encoder_depth * block_flops(le, le, d,
                                                                               mar.mlp_ratio)
    dec = 2 * le * d * dd + (mar.decoder_depth - 1) * block_flops(nb + seq, nb + seq, dd,
                                                                   mar.mlp_ratio)
    last_q = nb + seq if official else plan.n_query
    dec += block_flops(last_q, nb + seq, dd, mar.mlp_ratio)
    out['encoder'] += branches * enc
    out['decoder'] += branches * dec
    out['proj'] += branches * 2 * le * (d * h + h * h + h * h + h * d)
    for v in rows:
      out['llm'] += llm_flops(llm, le, (v if official else lp) + le)
    if official:
      out['head'] += branches * s.n_pred * s.actual_steps * head_flops_per_eval(mar)
    else:
      out['head'] += head_flops_call(mar, branches * s.n_pad, s.actual_steps)
  out['total'] = sum(out.values())
  return out
