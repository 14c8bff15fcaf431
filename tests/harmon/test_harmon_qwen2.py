"""Flax Qwen2 (`disa_jax.layers.qwen2`) vs Hugging Face transformers' Qwen2Model (PyTorch CPU).

Small random configs with the real head geometry (GQA groups 7 and 6), every tensor randomised
(HF initialises q/k/v biases to zero and RMSNorm weights to one, which would hide bias and
scale bugs), fp32 with matmul precision 'highest'; tolerance: max relative error <= 1e-5.
The Harmon call pattern uses HF's own cache: prefill without a mask, then an image segment with
mask [prompt validity ; ones], position ids cumsum(mask) - 1, and the cache cropped back.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from disa_jax.layers.qwen2 import KVCache, Qwen2Config  # noqa: E402
from disa_jax.systems.harmon.convert import load_qwen2_state_dict  # noqa: E402

GEOMETRIES = {
  'group7': dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2),   # 0.5B-like
  'group6': dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1),     # 1.5B-like
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def make_pair(geometry, layers=2, seed=0):
  g = GEOMETRIES[geometry]
  hf_cfg = transformers.Qwen2Config(
    vocab_size=300, intermediate_size=2 * g['hidden_size'], num_hidden_layers=layers,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512,
    attn_implementation='eager', **g)
  torch.manual_seed(seed)
  hf = transformers.Qwen2Model(hf_cfg).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * r if 'norm' in name else 0.1 * r)
  cfg = Qwen2Config(vocab_size=300, intermediate_size=2 * g['hidden_size'],
                    num_hidden_layers=layers, **g)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  return hf, load_qwen2_state_dict(cfg, sd)


@pytest.fixture(autouse=True)
def _highest():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.mark.parametrize('geometry', sorted(GEOMETRIES))
def test_full_forward_matches_hf(geometry):
  hf, model = make_pair(geometry)
  ids = np.random.default_rng(0).integers(0, 300, (3, 17))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).last_hidden_state.numpy()
  out = model(model.embed(ids))
  assert rel_err(out, ref) <= 1e-5
  # Explicit positions are used, not array indices (RoPE is relative: a uniform shift is
  # invisible, a stretch is not).
  shifted = model(model.embed(ids), jnp.asarray(np.arange(17)[None].repeat(3, 0) + 5))
  assert rel_err(shifted, ref) <= 1e-5
  stretched = model(model.embed(ids), jnp.asarray(np.arange(17)[None].repeat(3, 0) * 2))
  assert rel_err(stretched, ref) > 1e-3


@pytest.mark.parametrize('geometry', sorted(GEOMETRIES))
def test_prompt_cache_and_image_segment_match_hf(geometry):
  from transformers.cache_utils import DynamicCache

  hf, model = make_pair(geometry, seed=3)
  rng = np.random.default_rng(1)
  rows, lp, seg = 4, 9, 7
  valid_len = np.array([9, 4, 6, 2])
  ids = rng.integers(0, 300, (rows, lp))
  prompt_mask = np.arange(lp)[None] < valid_len[:, None]
  segment = rng.normal(size=(rows, seg, model.config.hidden_size)).astype(np.float32)

  # HF: official Harmon pattern.
  with torch.no_grad():
    cache = DynamicCache()
    hf(torch.as_tensor(ids), past_key_values=cache, use_cache=True)
    mask = torch.cat([torch.as_tensor(prompt_mask).long(), torch.ones(rows, seg).long()], 1)
    pos = (mask.cumsum(1) - 1)[:, lp:]
    ref1 = hf(inputs_embeds=torch.as_tensor(segment), attention_mask=mask, position_ids=pos,
              past_key_values=cache, use_cache=True).last_hidden_state.numpy()
    cache.crop(lp)
    ref2 = hf(inputs_embeds=torch.as_tensor(segment), attention_mask=mask, position_ids=pos,
              past_key_values=cache, use_cache=True).last_hidden_state.numpy()
  np.testing.assert_array_equal(ref1, ref2)

  _, kv = model.prefill(model.embed(ids), prompt_mask)
  assert isinstance(kv, KVCache) and kv.keys.shape == (
    2, rows, lp, model.config.num_key_value_heads, model.config.hd)
  positions = valid_len[:, None] + np.arange(seg)[None]
  out = model(jnp.asarray(segment), jnp.asarray(positions), cache=kv)
  assert rel_err(out, ref1) <= 1e-5
  # Same computation as an unpadded causal forward of [valid prompt ; segment] per row.
  for r in range(rows):
    with torch.no_grad():
      emb = hf.embed_tokens(torch.as_tensor(ids[r:r + 1, :valid_len[r]]))
      full = hf(inputs_embeds=torch.cat([emb, torch.as_tensor(segment[r:r + 1])], 1))
    assert rel_err(out[r], full.last_hidden_state[0, valid_len[r]:].numpy()) <= 1e-5

  # Bucketed static layout: pad slots after the real tokens, hidden as keys, arbitrary ids.
  pad = 5
  padded = np.concatenate([segment, rng.normal(size=(rows, pad, segment.shape[2]))], 1)
  pos_pad = np.concatenate([positions, np.zeros((rows, pad), int)], 1)
  key_valid = np.arange(seg + pad)[None].repeat(rows, 0) < seg
  out_pad = model(jnp.asarray(padded, jnp.float32), jnp.asarray(pos_pad), cache=kv,
                  key_valid=jnp.asarray(key_valid))
  assert rel_err(out_pad[:, :seg], ref1) <= 1e-5


def test_bf16_close_to_fp32():
  hf, model = make_pair('group7', seed=5)
  ids = np.random.default_rng(2).integers(0, 300, (2, 12))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).last_hidden_state.numpy()
  cfg16 = Qwen2Config(**{**model.config.to_dict(), 'dtype': 'bfloat16'})
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  m16 = load_qwen2_state_dict(cfg16, sd)
  out = m16(m16.embed(ids))
  assert out.dtype == jnp.bfloat16
  assert rel_err(out.astype(jnp.float32), ref) <= 5e-2


def test_tied_lm_head_logits():
  hf, model = make_pair('group6', layers=1, seed=7)
  lm = transformers.Qwen2ForCausalLM(hf.config).eval()
  lm.model.load_state_dict(hf.state_dict())
  lm.tie_weights()
  ids = np.random.default_rng(3).integers(0, 300, (2, 6))
  with torch.no_grad():
    ref = lm(torch.as_tensor(ids)).logits.numpy()
  assert rel_err(model.logits(model(model.embed(ids))), ref) <= 1e-5
