"""A PyTorch reference of Harmon's text-to-image sampler (wusize/Harmon src/models/harmon.py
`Harmon.sample`, with the Harmon_DiSA per-iteration step counts), written for the parity tests
from shared/spec/harmon.md.

Kept as the official code does it (deliberately *not* the static-shape scheme of the JAX port):
- the LLM is Hugging Face transformers' `Qwen2ForCausalLM` (`llm.model` is called), the prompt is
  prefilled once into a `DynamicCache` with no mask, every MAR iteration appends the image segment
  with mask [prompt validity ; ones] and position ids cumsum(mask) - 1, then the cache is cut
  back to the prompt length;
- the MAR encoder *drops* masked tokens (variable lengths), buffers are moved to the end of the
  LLM segment and back, the residual x_enc + proj_out(h) feeds the decoder;
- pos-embeds are bilinearly interpolated with `F.interpolate` on every forward;
- rows: B conditional prompts then B unconditional; orders drawn for all rows, the uncond half
  overwritten; the head samples all 2N predicted rows, cond rows copied over uncond rows.
Orders and noise can be injected (`orders=`, `noise_source=`) as for `reference.mar`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache

from reference.mar import SpacedDiffusionRef, TorchMAR


def hf_qwen2_config(cfg, attn_implementation: str = 'eager'):
  """transformers.Qwen2Config for a `disa_jax.layers.qwen2.Qwen2Config`."""
  return transformers.Qwen2Config(
    vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
    rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
    max_position_embeddings=32768, attn_implementation=attn_implementation)


def _resize(pe, src, dst):
  """[1, src*src, D] -> [1, dst*dst, D] with F.interpolate bilinear (the official way)."""
  if src == dst:
    return pe
  img = pe.reshape(1, src, src, -1).permute(0, 3, 1, 2)
  img = F.interpolate(img, size=(dst, dst), mode='bilinear')
  return img.permute(0, 2, 3, 1).reshape(1, dst * dst, -1)


class TorchHarmon(nn.Module):
  """`cfg` is a `disa_jax.systems.harmon.HarmonConfig` (only its numbers are read)."""

  def __init__(self, cfg, attn_implementation: str = 'eager'):
    super().__init__()
    self.cfg = cfg
    self.llm = transformers.Qwen2ForCausalLM(hf_qwen2_config(cfg.llm, attn_implementation))
    self.mar = TorchMAR(cfg.mar)
    d, h = cfg.mar.encoder_embed_dim, cfg.llm.hidden_size
    self.proj_in = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, h))
    self.proj_out = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, d))
    self.nb = cfg.mar.buffer_size
    self.src = cfg.mar.seq_h

  # MAR with image_shape (src/models/mar/mar.py forward_mae_encoder / forward_mae_decoder) ----
  def _pos(self, table, m, buffered=True):
    if not buffered:
      return _resize(table, self.src, m)
    return torch.cat([table[:, :self.nb], _resize(table[:, self.nb:], self.src, m)], dim=1)

  def mar_encoder(self, x, mask, class_embedding, m):
    mar = self.mar
    x = mar.z_proj(x)
    b, _, d = x.shape
    x = torch.cat([x.new_zeros(b, self.nb, d), x], dim=1)
    mwb = torch.cat([mask.new_zeros(b, self.nb), mask], dim=1)
    x[:, :self.nb] = class_embedding.view(b, -1, d)
    x = mar.z_proj_ln(x + self._pos(mar.encoder_pos_embed_learned, m))
    x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(b, -1, d)
    for blk in mar.encoder_blocks:
      x = blk(x)
    return mar.encoder_norm(x)

  def mar_decoder(self, x, mask, m):
    mar = self.mar
    x = mar.decoder_embed(x)
    b = mask.shape[0]
    mwb = torch.cat([torch.zeros(b, self.nb), mask], dim=1)
    pad = mar.mask_token.repeat(b, mwb.shape[1], 1).clone()
    pad[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[2])
    x = pad + self._pos(mar.decoder_pos_embed_learned, m)
    for blk in mar.decoder_blocks:
      x = blk(x)
    x = mar.decoder_norm(x)[:, self.nb:]
    return x + self._pos(mar.diffusion_pos_embed_learned, m, buffered=False)

  # Harmon (src/models/harmon.py) -------------------------------------------------------------
  def forward_mae_encoder(self, tokens, mask, m, attention_mask, past_key_values):
    b = tokens.shape[0]
    x_enc = self.mar_encoder(tokens, mask, self.mar.fake_latent.expand(b, -1), m)
    return _harmon_llm(self, x_enc, attention_mask.bool(), past_key_values)

  def prefill(self, input_ids):
    cache = DynamicCache()
    self.llm.model(input_ids=input_ids, attention_mask=None, position_ids=None,
                   past_key_values=cache, use_cache=True, return_dict=True)
    return cache

  @staticmethod
  def curtail_cache(cache, length):
    for i in range(len(cache.key_cache)):
      cache.key_cache[i] = cache.key_cache[i][:, :, :length]
      cache.value_cache[i] = cache.value_cache[i][:, :, :length]

  def step_conditions(self, tokens, mask, m, input_ids, attention_mask):
    """z [R, L, Dd] of one MAR iteration (fresh prompt cache): the whole-step parity hook."""
    cache = self.prefill(input_ids)
    x_enc = self.forward_mae_encoder(tokens, mask, m, attention_mask, cache)
    return self.mar_decoder(x_enc, mask, m)


def _default_noise(step, n, num_steps, ch, cfg_on):
  del step
  rows = 2 * n if cfg_on else n
  return torch.randn(n, ch), (torch.randn(rows, ch) for _ in range(num_steps))


@torch.no_grad()
def sample(model: TorchHarmon, input_ids, attention_mask, *, num_iter=64, cfg=3.0,
           cfg_schedule='constant', temperature=1.0, steps=100, clip=None, orders=None,
           noise_source=None, grid=None, timings=None):
  """Official `Harmon.sample` up to the token latents: returns tokens [B, L, C] of the cond rows.

  input_ids / attention_mask [R, Lp] with R = 2B under CFG (cond rows, then uncond rows) or B.
  steps: int or a per-iteration list (DiSA's T(s)); clip: 950 for DiSA, None for Harmon.
  orders [B, L] (default numpy shuffles for all R rows, uncond half overwritten);
  noise_source(step, n, num_steps) -> (x_T [n, C], iterator of [2n or n, C]).
  timings (dict) accumulates 'encoder', 'llm' (prefill included), 'decoder', 'head' seconds.
  """
  mar = model.mar
  m = grid or int(round(math.sqrt(model.cfg.runtime_mar.seq_len)))
  seq, ch = m * m, model.cfg.mar.token_embed_dim
  input_ids = torch.as_tensor(np.asarray(input_ids))
  attention_mask = torch.as_tensor(np.asarray(attention_mask)).bool()
  rows = input_ids.shape[0]
  cfg_on = cfg != 1.0
  b = rows // 2 if cfg_on else rows
  steps = [int(steps)] * num_iter if np.isscalar(steps) else [int(s) for s in steps]
  mask = torch.ones(rows, seq)
  tokens = torch.zeros(rows, seq, ch)
  if orders is None:
    orders = np.stack([np.random.permutation(seq) for _ in range(rows)])
    orders[b:] = orders[:b] if cfg_on else orders[b:]
  else:
    orders = np.asarray(orders)
    orders = np.concatenate([orders, orders]) if cfg_on else orders
  orders = torch.as_tensor(orders, dtype=torch.long)
  t = timings if timings is not None else {}
  t0 = time.perf_counter()
  cache = model.prefill(input_ids)
  t['llm'] = t.get('llm', 0.0) + time.perf_counter() - t0
  lp = input_ids.shape[1]
  for step in range(num_iter):
    cur = tokens.clone()
    t0 = time.perf_counter()
    x_enc = model.mar_encoder(tokens, mask, mar.fake_latent.expand(rows, -1), m)
    t1 = time.perf_counter()
    x_enc = _harmon_llm(model, x_enc, attention_mask, cache)
    model.curtail_cache(cache, lp)
    t2 = time.perf_counter()
    z = model.mar_decoder(x_enc, mask, m)
    t3 = time.perf_counter()
    mask_len = np.floor(seq * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
    mask_len = max(1.0, min(float(mask[0].sum()) - 1, mask_len))
    mask_next = torch.zeros(rows, seq)
    mask_next.scatter_(1, orders[:, :int(mask_len)], 1.0)
    if cfg_on:
      mask_next[b:] = mask_next[:b]
    to_pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(
      mask.bool(), mask_next.bool())
    mask = mask_next
    zs = z[to_pred.nonzero(as_tuple=True)]
    cfg_iter = 1 + (cfg - 1) * (seq - mask_len) / seq if cfg_schedule == 'linear' else cfg
    diff = SpacedDiffusionRef(steps[step], clip)
    n = zs.shape[0] // (2 if cfg_on else 1)
    if noise_source is None:
      x_t, it = _default_noise(step, n, diff.n, ch, cfg_on)
    else:
      x_t, it = noise_source(step, n, diff.n)
    x_t = torch.as_tensor(np.asarray(x_t), dtype=torch.float32)
    it = (torch.as_tensor(np.asarray(e), dtype=torch.float32) for e in it)
    if cfg_on:
      out = diff.p_sample_loop(mar.diffloss.net.forward_with_cfg, torch.cat([x_t, x_t]), it,
                               temperature, c=zs, cfg_scale=cfg_iter)
    else:
      out = diff.p_sample_loop(mar.diffloss.net.forward, x_t, it, temperature, c=zs)
    cur[to_pred.nonzero(as_tuple=True)] = out
    if cfg_on:
      cur[b:] = cur[:b]
    tokens = cur.clone()
    t4 = time.perf_counter()
    for k, dt in (('encoder', t1 - t0), ('llm', t2 - t1), ('decoder', t3 - t2),
                  ('head', t4 - t3)):
      t[k] = t.get(k, 0.0) + dt
  return tokens[:b]


def _harmon_llm(model, x_enc, attention_mask, cache):
  """`Harmon.forward_mae_encoder` after the MAR encoder: buffers to the end, LLM on the prompt
  cache, buffers back, residual."""
  nb = model.nb
  b = x_enc.shape[0]
  z = model.proj_in(x_enc)
  z = torch.cat([z[:, nb:], z[:, :nb]], dim=1)
  seg = z.shape[1]
  am = torch.cat([attention_mask, attention_mask.new_ones(b, seg)], dim=1)
  pos = (torch.cumsum(am, dim=1) - 1).clamp(min=0)[:, -seg:]
  h = model.llm.model(inputs_embeds=z, attention_mask=am, position_ids=pos,
                      past_key_values=cache, use_cache=True, return_dict=True).last_hidden_state
  h = h[:, -seg:]
  h = torch.cat([h[:, -nb:], h[:, :-nb]], dim=1)
  return x_enc + model.proj_out(h)


def load_from_flax(model: TorchHarmon, flax_torch_sd: dict):
  """Loads a state dict in official key names (e.g. `flax_state_to_torch` of a JAX Harmon);
  the tied `llm.lm_head.weight` is filled from the embedding."""
  sd = {k: torch.as_tensor(np.array(v, np.float32)) for k, v in flax_torch_sd.items()}
  sd['llm.lm_head.weight'] = sd['llm.model.embed_tokens.weight']
  model.load_state_dict(sd, strict=True)
  return model.eval()
