"""LazyMAR feature caching for MAR's backbone (feihongyan1/LazyMAR models/mar_cache.py, basic.py).

Between consecutive AR steps most token features barely change, so LazyMAR recomputes only a
few rows per step and reuses the rest. AR step s is a *refresh* step (the full backbone, which
also fills every cache) when s < start or (s - start) % interval == 0 (LazyMAR: start 5,
interval 9 at 64 AR steps); every other step is *lazy*:

- encoder token cache: the encoder runs its queries only over the buffer and the n_prev tokens
  predicted at the previous step (just made visible). Their keys/values are written into a
  per-layer K/V cache (one slot per sequence position); the keys of every other visible token
  are the cached (stale) ones from the step that last computed them.
- decoder input cache: the decoder input (decoder_embed + position embedding) is replaced only
  at the buffer and the newly visible positions; every other slot keeps its cached value.
- decoder token selection: decoder layers 0..layer-1 run over all nb + L slots; at layer
  `layer` (LazyMAR: 3) the attention runs over all slots and each slot's value vectors are
  compared with that layer's values of the previous step: score = mean over heads of the
  cosine similarity, forced to 0 at the slots predicted now and at the previous step. The
  `keep` slots of lowest score (ascending, stable) continue; the rest are dropped. Layers after
  it run queries only on the kept rows; their keys/values are the cache updated at the kept
  slots. keep = max(n_pred + n_prev + margin, int((nb + L) * ratio(s))), ratio from LazyMAR's
  64-entry retention table (1.0 for the first 20 steps, then 0.6 ... 0.05), read at
  floor(s * 64 / K) for K AR steps; then rounded up to `keep_bucket` rows (static shapes; 1 =
  LazyMAR's exact count) and capped at nb + L.
- CFG cache: lazy steps run the conditional branch only; the unconditional last-layer output is
  the conditional one plus the difference (uncond - cond) stored at the last refresh step.
  Dropped slots output 0 before `decoder_norm` (as the official unprune), so a predicted token
  that was not kept would read the norm's bias (never happens unless more than `margin` slots
  have negative similarity).
- head cache (LazyMAR models/diffloss_cached.py; `disa_jax/heads/step_cache.py`): inside
  each head call, the denoising steps between refreshes reuse the residual updates of head
  blocks 1..4, the other blocks' MLP outputs and the CFG difference of eps, on the
  conditional rows only. Threshold `head` (0: off); by default LazyMAR's 7 per 100 steps
  scaled to each chain of A steps, max(1, round(7 A / 100)) (7 over DiSA's 5-50-step chains
  costs quality: docs/caching.md).

Static shapes: a refresh step is compiled per encoder bucket (as the uncached backbone), a lazy
step per (new-token bucket, keep). The caches are [B, nb + L, D] per layer (conditional branch
only), carried between steps as a pytree. With `interval=1` every step is a refresh step and the
result equals the uncached sampler (tests/test_lazy_cache.py).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.layers.vit import dot_product_attention
from disa_jax.systems.mar.model import decoder_slots, fill_rows, inverse_slots
from disa_jax.systems.mar.sampling import _positions

# LazyMAR's retention ratio per AR step (64 steps), models/basic.py RETAIN_RATIO_SCHEDULE.
RETAIN_RATIOS_64 = (1.0,) * 20 + (0.6, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4) + (
  0.15,) * 5 + (0.12,) * 5 + (0.05,) * 24


# LazyMAR's head-cache threshold (models/mar_cache.py: cache_threshold=7) for its 100-step
# chains; DiSA's chains are 5-50 steps, so by default it scales with the chain length.
HEAD_THRESHOLD_100 = 7


class CacheSpecError(UserError):
  """A `--cache` / `sampling.cache` spec that does not parse."""


@dataclasses.dataclass(frozen=True)
class LazyConfig:
  """Knobs of the LazyMAR cache (None: LazyMAR's 64-step value scaled to K AR steps)."""

  start: int | None = None       # AR steps [0, start) are refresh steps (64 steps: 5)
  interval: int | None = None    # refresh when (s - start) % interval == 0 (64 steps: 9)
  layer: int = 3                 # decoder layer whose value similarity selects the rows
  margin: int = 15               # extra rows beyond the predicted ones
  keep_bucket: int = 16          # kept rows rounded up to a multiple of this
  ratio_scale: float = 1.0       # multiplies the retention table (1: LazyMAR's)
  head: int | None = None        # head-cache threshold (heads/step_cache.py; 0: off;
                                 # None: LazyMAR's 7 per 100 steps scaled to each chain)

  def resolved(self, num_iter: int, decoder_depth: int) -> LazyConfig:
    start = self.start if self.start is not None else round(5 * num_iter / 64)
    interval = self.interval if self.interval is not None else max(1, round(9 * num_iter / 64))
    return dataclasses.replace(self, start=start, interval=interval,
                               layer=min(self.layer, decoder_depth - 1))

  def is_refresh(self, s: int) -> bool:
    return s < self.start or (s - self.start) % self.interval == 0

  def head_threshold(self, num_steps: int) -> int:
    """Head-cache threshold for a head chain of num_steps steps (0 or 1: no caching)."""
    if self.head is not None:
      return self.head
    return max(1, round(HEAD_THRESHOLD_100 * num_steps / 100))

  def ratio(self, s: int, num_iter: int) -> float:
    return min(1.0, RETAIN_RATIOS_64[min(63, s * 64 // num_iter)] * self.ratio_scale)


_FIELDS = {'start': int, 'interval': int, 'layer': int, 'margin': int, 'keep_bucket': int,
           'ratio_scale': float, 'head': int}


def parse_cache(spec) -> LazyConfig | None:
  """'' / 'none' -> None; 'lazymar' or 'lazymar:interval=9,start=5,layer=3,margin=15,
  keep_bucket=16,ratio_scale=1.0,head=7' -> LazyConfig; a LazyConfig passes through."""
  if spec is None or isinstance(spec, LazyConfig):
    return spec
  text = str(spec).strip()
  if text in ('', 'none'):
    return None
  name, _, args = text.partition(':')
  if name != 'lazymar':
    raise CacheSpecError(f'cache {text!r}: unknown cache {name!r}; use none or lazymar[:k=v,...] '
                         f'with keys {", ".join(_FIELDS)}')
  kw = {}
  for item in filter(None, args.split(',')):
    key, eq, val = item.partition('=')
    if not eq or key not in _FIELDS:
      raise CacheSpecError(f'cache {text!r}: bad item {item!r}; use key=value with keys '
                           f'{", ".join(_FIELDS)}')
    try:
      kw[key] = _FIELDS[key](val)
    except ValueError:
      raise CacheSpecError(f'cache {text!r}: {key} must be a number, got {val!r}') from None
  for key in ('start', 'layer', 'margin', 'head'):
    if kw.get(key, 0) < 0:
      raise CacheSpecError(f'cache {text!r}: {key} must be >= 0')
  for key in ('interval', 'keep_bucket'):
    if kw.get(key, 1) < 1:
      raise CacheSpecError(f'cache {text!r}: {key} must be >= 1')
  if not (kw.get('ratio_scale', 1.0) > 0 and np.isfinite(kw.get('ratio_scale', 1.0))):
    raise CacheSpecError(f'cache {text!r}: ratio_scale must be finite and > 0')
  return LazyConfig(**kw)


# ------------------------------------------------------------------------------------------
# Blocks with explicit keys/values


def _qkv(blk, x):
  """LN1 + fused qkv of a ViT block: x [B, n, D] -> q, k, v [B, n, H, d]."""
  b, n, d = x.shape
  h = blk.attn.num_heads
  y = blk.norm1(x).astype(blk.dtype or x.dtype)
  qkv = blk.attn.qkv(y).reshape(b, n, 3, h, d // h)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _finish_attn(blk, x, q, k, v, key_mask=None):
  """x + proj(attention(q; k, v)) for the rows x [B, n, D] whose queries are q."""
  b, n, d = x.shape
  o = dot_product_attention(q, k, v, key_mask, splits=blk.attn.splits)
  return x + blk.attn.proj(o.reshape(b, n, d)).astype(x.dtype)


def _mlp(blk, x):
  return x + blk.mlp(blk.norm2(x).astype(blk.dtype or x.dtype)).astype(x.dtype)


def _scatter_rows(cache, slots, rows):
  """cache [B, N, ...] with rows [B, n, ...] written at slots [B, n] (slot >= N: dropped)."""
  return jax.vmap(lambda c, s, r: c.at[s].set(r.astype(c.dtype), mode='drop'))(cache, slots,
                                                                                rows)


def _gather_rows(x, slots):
  return jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)


def _encoder_rows(model, tokens, positions, class_vec):
  """z_proj + position embedding + z_proj_ln of buffer + tokens at `positions` -> [B, nb+n, D]."""
  nb = model.config.buffer_size
  pos = model.encoder_pos_embed_learned[...][0]
  x = model.z_proj(tokens).astype(jnp.float32) + pos[nb + positions]
  buf = class_vec[:, None, :].astype(jnp.float32) + pos[:nb]
  return model.z_proj_ln(jnp.concatenate([buf, x], axis=1))


def _decoder_input(model, enc_out, slots, prev):
  """decoder_embed(enc_out) + pos embed written at slots [B, n] over the cached `prev`."""
  c = model.config
  y = model.decoder_embed(enc_out).astype(jnp.float32)
  pos = model.decoder_pos_embed_learned[...][0]
  y = y + pos[jnp.minimum(slots, c.buffer_size + c.seq_len - 1)]
  return _scatter_rows(prev, slots, y)


def _finish_z(model, rows, pred_pos):
  """decoder_norm of the last-layer rows [B, n, D] of the predicted positions [B, n] +
  diffusion pos embed."""
  return model.decoder_norm(rows) + model.diffusion_pos_embed_learned[...][0][pred_pos]


# ------------------------------------------------------------------------------------------
# Refresh and lazy steps (pure functions at the jit boundary)


def refresh_step(state, tokens, orders, class_vec, m_cur, n_pred, *, graphdef, visible_pad,
                 n_query, use_cfg):
  """The full backbone (both CFG branches) -> (z, pred_pos, pred_valid, cache).

  cache: enc_k/enc_v (De-tuples of [B, nb+L, H, d]), dec_in [B, nb+L, Dd], dec_k/dec_v
  (Dd-tuples of [B, nb+L, H, d]) (conditional branch) and cfg_diff [B, nb+L, Dd] (uncond -
  cond last-layer output; zeros without CFG). One buffer per layer, not stacked: the lazy step
  donates the cache and XLA updates each layer's rows in place instead of copying the stack."""
  model = nnx.merge(graphdef, state)
  c = model.config
  nb, seq = c.buffer_size, c.seq_len
  b = tokens.shape[0]
  vis_pos, vis_valid = _positions(orders, m_cur, seq - m_cur, visible_pad, seq)
  pred_pos, pred_valid = _positions(orders, m_cur - n_pred, n_pred, n_query, seq)
  vis_tok = _gather_rows(tokens, vis_pos)
  nbr = 2 if use_cfg else 1
  rep = lambda a: jnp.repeat(a, nbr, axis=0)  # noqa: E731  rows: image 0 cond, uncond, ...
  if use_cfg:
    fake = jnp.broadcast_to(model.fake_latent[...], class_vec.shape)
    cv = jnp.stack([class_vec, fake], axis=1).reshape(2 * b, -1)
  else:
    cv = class_vec
  cond = lambda a: a.reshape((b, nbr) + a.shape[1:])[:, 0]  # noqa: E731
  inv = inverse_slots(decoder_slots(vis_pos, vis_valid, nb, seq), nb + seq)
  key_mask = jnp.concatenate([jnp.ones((b * nbr, nb), bool), rep(vis_valid)], axis=1)
  x = _encoder_rows(model, rep(vis_tok), rep(vis_pos), cv)
  enc_k, enc_v = [], []
  for blk in model.encoder_blocks:
    q, k, v = _qkv(blk, x)
    enc_k.append(fill_rows(cond(k), inv, 0))
    enc_v.append(fill_rows(cond(v), inv, 0))
    x = _mlp(blk, _finish_attn(blk, x, q, k, v, key_mask))
  enc_out = model.encoder_norm(x)
  h = model.decoder_input(enc_out, rep(inv))
  dec_in = cond(h)
  dec_k, dec_v = [], []
  for blk in model.decoder_blocks:
    q, k, v = _qkv(blk, h)
    dec_k.append(cond(k))
    dec_v.append(cond(v))
    h = _mlp(blk, _finish_attn(blk, h, q, k, v))
  hc = cond(h)
  at_pred = lambda a: _gather_rows(a, nb + pred_pos)  # noqa: E731
  if use_cfg:
    hu = h.reshape((b, 2) + h.shape[1:])[:, 1]
    diff = hu - hc
    z = jnp.stack([_finish_z(model, at_pred(hc), pred_pos),
                   _finish_z(model, at_pred(hu), pred_pos)], axis=1)
  else:
    diff = jnp.zeros_like(hc)
    z = _finish_z(model, at_pred(hc), pred_pos)
  cache = dict(enc_k=tuple(enc_k), enc_v=tuple(enc_v), dec_in=dec_in,
               dec_k=tuple(dec_k), dec_v=tuple(dec_v), cfg_diff=diff)
  return z, pred_pos, pred_valid, cache


def lazy_step(state, cache, tokens, orders, class_vec, m_cur, n_pred, n_prev, *, graphdef,
              new_pad, keep, layer, n_query, use_cfg):
  """A lazy AR step (module docstring) -> (z, pred_pos, pred_valid, cache, kept [B, keep])."""
  model = nnx.merge(graphdef, state)
  c = model.config
  nb, seq = c.buffer_size, c.seq_len
  n_all = nb + seq
  b = tokens.shape[0]
  pred_pos, pred_valid = _positions(orders, m_cur - n_pred, n_pred, n_query, seq)
  new_pos, new_valid = _positions(orders, m_cur, n_prev, new_pad, seq)
  # Keys of the encoder: the buffer and every visible token (order rank >= m_cur).
  rank = jax.vmap(lambda o: jnp.zeros((seq,), jnp.int32).at[o].set(jnp.arange(seq)))(orders)
  key_mask = jnp.concatenate([jnp.ones((b, nb), bool), rank >= m_cur], axis=1)
  slots = decoder_slots(new_pos, new_valid, nb, seq)
  x = _encoder_rows(model, _gather_rows(tokens, new_pos), new_pos, class_vec)
  enc_k, enc_v = [], []
  for i, blk in enumerate(model.encoder_blocks):
    q, k, v = _qkv(blk, x)
    ck = _scatter_rows(cache['enc_k'][i], slots, k)
    cv = _scatter_rows(cache['enc_v'][i], slots, v)
    enc_k.append(ck)
    enc_v.append(cv)
    x = _mlp(blk, _finish_attn(blk, x, q, ck, cv, key_mask))
  h = _decoder_input(model, model.encoder_norm(x), slots, prev=cache['dec_in'])
  dec_in = h
  dec_k, dec_v = list(cache['dec_k']), list(cache['dec_v'])
  blocks = list(model.decoder_blocks)
  for i, blk in enumerate(blocks[:layer]):
    q, k, v = _qkv(blk, h)
    dec_k[i], dec_v[i] = k, v
    h = _mlp(blk, _finish_attn(blk, h, q, k, v))
  blk = blocks[layer]
  q, k, v = _qkv(blk, h)
  prev_v = dec_v[layer]
  dot = jnp.sum(v.astype(jnp.float32) * prev_v.astype(jnp.float32), axis=-1)
  norms = (jnp.linalg.norm(v.astype(jnp.float32), axis=-1)
           * jnp.linalg.norm(prev_v.astype(jnp.float32), axis=-1))
  score = jnp.mean(dot / jnp.maximum(norms, 1e-8), axis=-1)              # [B, nb + L]
  forced = jnp.zeros((b, n_all), bool)
  forced = _scatter_rows(forced, jnp.where(pred_valid, nb + pred_pos, n_all), pred_valid)
  forced = _scatter_rows(forced, jnp.where(new_valid, nb + new_pos, n_all), new_valid)
  score = jnp.where(forced, 0.0, score)
  kept = jnp.argsort(score, axis=1, stable=True)[:, :keep].astype(jnp.int32)
  dec_k[layer], dec_v[layer] = k, v
  hk = _gather_rows(_finish_attn(blk, h, q, k, v), kept)
  hk = _mlp(blk, hk)
  for i in range(layer + 1, len(blocks)):
    blk = blocks[i]
    q, k, v = _qkv(blk, hk)
    dec_k[i] = _scatter_rows(dec_k[i], kept, k)
    dec_v[i] = _scatter_rows(dec_v[i], kept, v)
    hk = _mlp(blk, _finish_attn(blk, hk, q, dec_k[i], dec_v[i]))
  # Last-layer rows of the predicted slots: the kept row that holds each, 0 where the slot was
  # dropped (the official unprune); only these rows, never all nb + L, are assembled.
  row_of = _gather_rows(inverse_slots(kept, n_all), nb + pred_pos)       # [B, n_query]
  hp = fill_rows(hk, row_of, 0.0)
  zc = _finish_z(model, hp, pred_pos)
  if use_cfg:
    zu = _finish_z(model, hp + _gather_rows(cache['cfg_diff'], nb + pred_pos), pred_pos)
    z = jnp.stack([zc, zu], axis=1)
  else:
    z = zc
  new_cache = dict(enc_k=tuple(enc_k), enc_v=tuple(enc_v), dec_in=dec_in,
                   dec_k=tuple(dec_k), dec_v=tuple(dec_v), cfg_diff=cache['cfg_diff'])
  return z, pred_pos, pred_valid, new_cache, kept


_FUNCTIONS = {'lazy_refresh': (refresh_step, {}),
              'lazy_step': (lazy_step, dict(donate_argnums=(1,)))}


# ------------------------------------------------------------------------------------------
# Host side: the per-step plan and the runner the Sampler calls


@dataclasses.dataclass(frozen=True)
class LazyStep:
  index: int
  refresh: bool
  n_prev: int      # tokens predicted at the previous step (lazy steps' encoder queries)
  new_pad: int     # their static bucket
  keep: int        # decoder rows kept after the selection layer


def lazy_plan(plan, model_config, lazy: LazyConfig, *, enc_bucket: int) -> list[LazyStep]:
  """Refresh / lazy decision and static sizes per AR step of a `SamplingPlan`."""
  n_all = model_config.buffer_size + model_config.seq_len
  out, n_prev = [], 0
  for s in plan.steps:
    refresh = s.index == 0 or lazy.is_refresh(s.index)
    new_pad = min(-(-n_prev // enc_bucket) * enc_bucket, model_config.seq_len) or 1
    keep = max(s.n_pred + n_prev + lazy.margin,
               int(n_all * lazy.ratio(s.index, plan.num_iter)))
    keep = min(-(-keep // lazy.keep_bucket) * lazy.keep_bucket, n_all)
    out.append(LazyStep(s.index, refresh, n_prev, new_pad, keep))
    n_prev = s.n_pred
  return out


class LazyBackbone:
  """Runs the backbone of one `Sampler.generate` call with the LazyMAR caches.

  `compile()` AOT-compiles every refresh / lazy bucket of the plan (kept in the sampler's
  executable table, so later calls reuse them); `step(s, tokens, orders, class_vec)` returns
  (z, pred_pos, pred_valid) like the uncached backbone. `kept` records, per lazy step, the rows
  the decoder kept (analysis and tests)."""

  def __init__(self, sampler, plan, lazy: LazyConfig):
    self.sampler, self.plan = sampler, plan
    sampler.functions.update(_FUNCTIONS)
    cfg = sampler.config
    self.lazy = lazy.resolved(plan.num_iter, cfg.decoder_depth)
    self.steps = lazy_plan(plan, cfg, self.lazy, enc_bucket=sampler.enc_bucket)
    self.cache = None
    self.kept: dict[int, np.ndarray] = {}

  def report(self) -> dict:
    lazy = [st for st in self.steps if not st.refresh]
    return {'cache': dataclasses.asdict(self.lazy),
            'refresh_steps': [st.index for st in self.steps if st.refresh],
            'kept_rows': [st.keep for st in lazy]}

  def _call(self, name, args, static):
    return self.sampler._run(name, args, static)

  def _args(self, st, tokens, orders, class_vec, cache=None):
    s = self.plan.steps[st.index]
    sp = self.sampler
    common = dict(graphdef=sp.graphdef, n_query=self.plan.n_query, use_cfg=self.plan.use_cfg)
    if st.refresh:
      return 'lazy_refresh', (sp.state, tokens, orders, class_vec, jnp.int32(s.m_cur),
                              jnp.int32(s.n_pred)), dict(common, visible_pad=s.visible_pad)
    cache = self.cache if cache is None else cache
    return 'lazy_step', (sp.state, cache, tokens, orders, class_vec, jnp.int32(s.m_cur),
                         jnp.int32(s.n_pred), jnp.int32(st.n_prev)), dict(
      common, new_pad=st.new_pad, keep=st.keep, layer=self.lazy.layer)

  def compile(self, tokens, orders, class_vec) -> float:
    """Compiles every refresh / lazy bucket of the plan not compiled yet (lazy steps are
    lowered against the cache shapes the refresh executable returns; step 0 is always a
    refresh); with `Sampler(warmup=True)` runs each new one once on placeholder inputs.
    Returns the wall seconds spent."""
    t_start = time.perf_counter()
    sp, cache_spec, new = self.sampler, None, []
    for st in self.steps:
      job = self._args(st, tokens, orders, class_vec, cache=cache_spec)
      if sp._key(*job) not in sp._executables:
        new.append(job)
      exe = sp._executable(*job)
      if st.refresh:
        cache_spec = exe.out_info[3]
    if sp.warmup and new:
      t0 = time.perf_counter()
      cache = None
      for name, args, static in new:
        if name == 'lazy_refresh':
          cache = sp._run(name, args, static)[3]
          continue
        if cache is None:   # a lazy bucket new in a plan whose refresh buckets are not
          cache = sp._run(*self._args(self.steps[0], tokens, orders, class_vec))[3]
        args = (args[0], jax.tree.map(jnp.copy, cache), *args[2:])   # lazy steps donate it
        jax.block_until_ready(sp._run(name, args, static))
      sp.phase_s['warmup'] += time.perf_counter() - t0
    return time.perf_counter() - t_start

  def step(self, s, tokens, orders, class_vec):
    st = self.steps[s.index]
    name, args, static = self._args(st, tokens, orders, class_vec)
    out = self._call(name, args, static)
    self.cache = out[3]
    if not st.refresh:
      self.kept[st.index] = out[4]
    return out[:3]


# ------------------------------------------------------------------------------------------
# Counted FLOPs (the model of `systems/mar/flops.py`, per image, both CFG branches)


def _cached_block_flops(rows_q: int, rows_kv: int, dim: int, mlp_ratio: float) -> float:
  """A block whose q/k/v/proj/MLP run on rows_q rows, attending to rows_kv keys (the other
  keys/values cached)."""
  from disa_jax.systems.mar.flops import block_flops

  return (block_flops(rows_q, rows_q, dim, mlp_ratio) - 4 * rows_q * rows_q * dim
          + 4 * rows_q * rows_kv * dim)


def plan_flops(model_config, plan, lazy: LazyConfig, *, enc_bucket: int = 16) -> dict:
  """Backbone and head FLOPs per image of a cached run (padded rows as run) next to the
  uncached ones of the same plan (`flops.backbone_flops` with the partial last block,
  `flops.plan_flops`); the head cache (`lazy.head` > 0) as `_cached_head_flops`."""
  from disa_jax.systems.mar.flops import backbone_flops
  from disa_jax.systems.mar.flops import plan_flops as head_plan_flops

  c = model_config
  lz = lazy.resolved(plan.num_iter, c.decoder_depth)
  steps = lazy_plan(plan, c, lz, enc_bucket=enc_bucket)
  nb, n_all = c.buffer_size, c.buffer_size + c.seq_len
  de, dd, r = c.encoder_embed_dim, c.decoder_embed_dim, c.mlp_ratio
  branches = 2 if plan.use_cfg else 1
  uncached = cached = 0.0
  for s, st in zip(plan.steps, steps, strict=True):
    full = backbone_flops(c, s.visible_pad, n_query=plan.n_query) * branches
    uncached += full
    if st.refresh:
      cached += backbone_flops(c, s.visible_pad) * branches
      continue
    q = nb + st.new_pad
    f = 2 * st.new_pad * c.token_embed_dim * de + 2 * q * de * dd
    f += c.encoder_depth * _cached_block_flops(q, nb + s.visible_pad, de, r)
    f += lz.layer * _cached_block_flops(n_all, n_all, dd, r)
    hidden = int(dd * r)
    f += (2 * n_all * dd * 3 * dd + 4 * n_all * n_all * dd + 2 * n_all * dd * dd
          + 4 * st.keep * dd * hidden)                      # selection layer: MLP on kept rows
    f += (c.decoder_depth - lz.layer - 1) * _cached_block_flops(st.keep, n_all, dd, r)
    cached += f
  head = head_plan_flops(c, plan, official=False)['head']
  head_cached = head
  if lz.head != 0:
    head_cached = sum(_cached_head_flops(c, branches * s.n_pad, s.actual_steps,
                                         lz.head_threshold(s.actual_steps), branches)
                      for s in plan.steps)
  return {'backbone_uncached': uncached, 'backbone_cached': cached, 'head': head,
          'head_cached': head_cached, 'backbone_ratio': uncached / cached,
          'head_ratio': head / head_cached,
          'total_ratio': (uncached + head) / (cached + head_cached),
          'refresh_steps': sum(st.refresh for st in steps), 'num_iter': plan.num_iter}


def _cached_head_flops(c, rows: int, num_steps: int, threshold: int, branches: int) -> float:
  """FLOPs of one head call under the head cache (`heads/step_cache.py`; `rows` over all CFG
  branches, lazy steps on the conditional rows only), counted as `flops.head_flops_call`;
  threshold 0 or 1: the uncached call."""
  from disa_jax.heads.step_cache import EARLY, LAZY, block_split, step_kinds
  from disa_jax.systems.mar.flops import head_flops_call, head_trunk_flops

  w = c.diffloss_w
  reuse, _ = block_split(c.diffloss_d)
  full = head_trunk_flops(c)
  blocks_out = c.diffloss_d * 2 * 5 * w * w                  # every block: modulation + MLP
  lazy = full - blocks_out + len(reuse) * 2 * 3 * w * w      # + the run blocks' modulations
  early = lazy + len(reuse) * 2 * 2 * w * w                  # + their MLPs
  kinds = step_kinds(num_steps, max(1, threshold))
  n_lazy, n_early = int((kinds == LAZY).sum()), int((kinds == EARLY).sum())
  cond = rows // branches
  # the uncached call, with the trunk of every non-refresh step replaced by what it runs
  f = head_flops_call(c, rows, num_steps) - (n_lazy + n_early) * rows * full
  return float(f + n_early * cond * early + n_lazy * cond * lazy)
