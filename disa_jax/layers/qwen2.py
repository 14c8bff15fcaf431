"""A Qwen2 / Qwen2.5 decoder (the `Qwen2Model` trunk of Hugging Face transformers) in flax.nnx.

Matches `transformers/models/qwen2/modeling_qwen2.py` (4.45.2, the version Harmon pins).
Shapes: R rows, S query tokens, H hidden, nH query heads, nKV key/value heads (GQA group
G = nH / nKV), hd head dim, Lp prompt (cache) length.

  x   = embed_tokens[ids]                         (or caller-supplied embeddings, no scaling)
  per layer:  x <- x + o_proj(Attn(rms1(x)));   x <- x + down(silu(gate(rms2(x))) * up(rms2(x)))
  out = norm(x)                                   (`last_hidden_state`, after the final RMSNorm)

- RMSNorm (official order): upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back to the input
  dtype, *then* multiply by the weight.
- Attention: q/k/v projections with bias, o_proj without; RoPE with theta from the config on the
  explicit per-row `positions` (split-half rotation: (a cos - b sin, b cos + a sin) with a, b the
  two halves of the head dim; inv_freq and angles in fp32, cos/sin cast to the activation
  dtype); scores q k^T / sqrt(hd) and softmax in fp32; query head h reads kv head h // G.
- KV cache (static shapes): `prefill` runs the padded prompt (plain causal, no mask; padding is
  on the right so it never reaches a valid token) and returns every layer's post-RoPE K/V
  `[layers, R, Lp, nKV, hd]` with the prompt validity mask. `__call__` with a cache runs a
  segment whose queries attend to [cache keys where valid] + [segment keys, causal], and never
  writes the segment back (the official code appends and then truncates the cache to Lp, which
  is the same computation).
- Tied embeddings: the LM head (`logits`) is `x @ embed_tokens^T`; `llm.lm_head.weight` is
  not a separate parameter.

State-tree names mirror the HF state dict (`embed_tokens`, `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.mlp.{gate,up,down}_proj`, `layers.{i}.{input,post_attention}_layernorm`, `norm`);
Linear kernels are (in, out) = torch weight^T, RMSNorm weights are `scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_init = jax.nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Qwen2 architecture (HF `Qwen2Config` field names where they exist)."""

  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_hidden_layers: int = 24
  num_attention_heads: int = 14
  num_key_value_heads: int = 2
  head_dim: int = 0             # 0: hidden_size // num_attention_heads (as HF Qwen2)
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  dtype: str = 'float32'        # parameter and activation dtype

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}')
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f'num_attention_heads {self.num_attention_heads} is not a multiple of '
                       f'num_key_value_heads {self.num_key_value_heads}')
    if not self.head_dim and self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not divisible by '
                       f'{self.num_attention_heads} heads; set head_dim')
    if self.hd % 2:
      raise ValueError(f'head_dim must be even for RoPE, got {self.hd}')

  @property
  def hd(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Any) -> Qwen2Config:
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown Qwen2 config keys {unknown}; known keys: {sorted(names)}')
    return cls(**d)


# The two Qwen2.5 Instruct trunks Harmon uses ([Qwen-cfg] in shared/spec/harmon.md §1.4).
QWEN2_5_0_5B = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2)
QWEN2_5_1_5B = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Post-RoPE keys/values of a prefilled prompt and which prompt slots are valid.

  keys, values: [layers, R, Lp, nKV, hd] (activation dtype); valid: [R, Lp] bool.
  """

  keys: jax.Array
  values: jax.Array
  valid: jax.Array

  @property
  def length(self) -> int:
    return self.keys.shape[2]


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    dtype = x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * h.astype(dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
  """cos, sin [R, S, hd] for integer positions [R, S] (HF Qwen2RotaryEmbedding)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [R, S, heads, hd]; cos/sin [R, S, hd]. Split-half rotation."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


def _linear(din, dout, bias, dtype, rngs):
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=_init,
                    bias_init=jax.nn.initializers.zeros, rngs=rngs)


class Qwen2Attention(nnx.Module):
  def __init__(self, c: Qwen2Config, *, rngs: nnx.Rngs):
    dt = c.compute_dtype
    self.num_heads, self.num_kv_heads, self.head_dim = (
      c.num_attention_heads, c.num_key_value_heads, c.hd)
    self.theta = c.rope_theta
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.hd, True, dt, rngs)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.hd, True, dt, rngs)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.hd, True, dt, rngs)
    self.o_proj = _linear(c.num_attention_heads * c.hd, c.hidden_size, False, dt, rngs)

  def __call__(self, x, cos, sin, mask, cache_kv=None):
    """x [R, S, H]; mask [R, S, Lk] bool (Lk = Lp + S with a cache, else S).

    Returns (output [R, S, H], (k, v) of this segment [R, S, nKV, hd])."""
    r, s, _ = x.shape
    nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = apply_rope(self.q_proj(x).reshape(r, s, nh, hd), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(r, s, nkv, hd), cos, sin)
    v = self.v_proj(x).reshape(r, s, nkv, hd)
    keys, values = k, v
    if cache_kv is not None:
      keys = jnp.concatenate([cache_kv[0].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([cache_kv[1].astype(v.dtype), v], axis=1)
    g = nh // nkv
    qg = q.reshape(r, s, nkv, g, hd)
    scores = jnp.einsum('rskgd,rtkd->rkgst', qg, keys,
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum('rkgst,rtkd->rskgd', probs, values).reshape(r, s, nh * hd)
    return self.o_proj(out.astype(x.dtype)), (k, v)


class Qwen2MLP(nnx.Module):
  def __init__(self, c: Qwen2Config, *, rngs: nnx.Rngs):
    dt = c.compute_dtype
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, False, dt, rngs)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, False, dt, rngs)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, False, dt, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
  def __init__(self, c: Qwen2Config, *, rngs: nnx.Rngs):
    dt = c.compute_dtype
    self.self_attn = Qwen2Attention(c, rngs=rngs)
    self.mlp = Qwen2MLP(c, rngs=rngs)
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=dt)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=dt)

  def __call__(self, x, cos, sin, mask, cache_kv=None):
    a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv)
    x = x + a
    return x + self.mlp(self.post_attention_layernorm(x)), kv


def causal_mask(rows: int, length: int, key_valid=None):
  """[rows, S, S] lower-triangular mask, optionally AND a key mask [rows, S]."""
  m = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (rows, length, length))
  if key_valid is not None:
    m = m & key_valid[:, None, :]
  return m


class Qwen2Model(nnx.Module):
  """The Qwen2 trunk (HF `Qwen2Model`): embeddings, decoder layers, final RMSNorm."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.config = config
    dt = config.compute_dtype
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dt,
                                  param_dtype=dt, embedding_init=_init, rngs=rngs)
    self.layers = nnx.List([Qwen2DecoderLayer(config, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=dt)

  def embed(self, ids):
    """Token embeddings [R, S, H] of ids [R, S] (no scaling)."""
    return self.embed_tokens(jnp.asarray(ids, jnp.int32))

  def logits(self, hidden):
    """Tied LM head: hidden [.., H] -> [.., vocab] (fp32)."""
    return jnp.einsum('...h,vh->...v', hidden, self.embed_tokens.embedding[...],
                      preferred_element_type=jnp.float32)

  def __call__(self, inputs_embeds, positions=None, *, cache: KVCache | None = None,
               key_valid=None, return_kv: bool = False):
    """last_hidden_state [R, S, H] (post final norm) of a causal forward.

    positions [R, S] int (default 0..S-1 per row). With `cache`, the segment attends to the
    valid cache slots and causally to itself; `key_valid` [R, S] additionally hides segment
    keys (padding). With `return_kv`, also returns this forward's own K/V as a `KVCache`
    (valid = `key_valid` or all True): that is how `prefill` builds the prompt cache.
    """
    x = jnp.asarray(inputs_embeds).astype(self.config.compute_dtype)
    r, s, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (r, s))
    cos, sin = rope_cos_sin(positions, self.config.hd, self.config.rope_theta, x.dtype)
    mask = causal_mask(r, s, key_valid)
    if cache is not None:
      prefix = jnp.broadcast_to(cache.valid[:, None, :], (r, s, cache.length))
      mask = jnp.concatenate([prefix, mask], axis=-1)
    ks, vs = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
      x, (k, v) = layer(x, cos, sin, mask, layer_cache)
      if return_kv:
        ks.append(k)
        vs.append(v)
    out = self.norm(x)
    if not return_kv:
      return out
    valid = jnp.ones((r, s), bool) if key_valid is None else jnp.asarray(key_valid, bool)
    return out, KVCache(jnp.stack(ks), jnp.stack(vs), valid)

  def prefill(self, inputs_embeds, prompt_valid):
    """Runs the right-padded prompt [R, Lp, H] (plain causal, positions 0..Lp-1, no mask, as
    the official prefill) and returns (hidden [R, Lp, H], KVCache with valid = prompt_valid)."""
    out, cache = self(inputs_embeds, return_kv=True)
    return out, KVCache(cache.keys, cache.values, jnp.asarray(prompt_valid, bool))


class Qwen2ForCausalLM(nnx.Module):
  """Wrapper whose state tree matches HF `Qwen2ForCausalLM` (`model.*`; the LM head is tied)."""

  def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
    self.model = Qwen2Model(config, rngs=rngs)
