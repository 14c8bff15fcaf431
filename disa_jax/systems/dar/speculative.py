"""Speculative decoding of D-AR ids with a smaller draft GPT (distribution-preserving).

Not in the official code (spec §7 lists it as an option): late ids are more constrained by
the ones before them, so a small draft GPT guesses runs of them and the target GPT checks a
whole run in one K-token pass instead of K one-token steps.

Per round, with n ids known (the last one not yet fed to either model):
  draft   feeds [id_{n-1}, d_n, ..., d_{n+K-2}] one at a time at positions n..n+K-1 and
          samples d_j ~ q_j (its own CFG at the same per-position scale, the same temperature /
          top-k / top-p) with the plain sampler's uniform u_j
  target  one pass over the same K ids at the same positions: p_n..p_{n+K-1}, the exact
          distributions the plain loop would sample from (CFG, temperature, filters)
  row b, position j: accept d_j if a_j q_j(d_j) <= p_j(d_j), else draw from
          max(p_j - q_j, 0) (normalised; p_j if that is all zero) with the uniform r_j
  advance every row by m + 1 ids, m = the first position any row rejected (all K if none)
The target's distribution is kept exactly (Leviathan et al. 2023, Chen et al. 2023): every
decided id is d_j with probability min(1, p/q), else a residual draw, i.e. p_j. Stopping at
the batch's first rejection keeps shapes static; ids a row accepted beyond it are decided
again next round from the same prefix and the same (u_j, a_j, r_j), so they come out
identical: a row's ids depend only on its own randomness, not on the batch it is in. With
draft == target every draft is accepted and the ids equal the plain loop's (same u_j).

Ids before `start` (and any layout prefix) come from the plain loop; the draft is prefilled
once with them. Caches are (layers, 2, rows, H, round_up(L + K, 8), 64) so a round near the
end never writes past them (positions past L - 1 are computed and dropped).
Compiles: target prefill + step (plain part), draft prefill (per switch point), one draft
round and one verify function (K static).
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.sampling import (
  Generation,
  Sampler,
  SamplingOptions,
  cfg_schedule,
  filter_logits,
  guide,
  sample_from_logits,
)


def processed_probs(logits, temperature: float, top_k: int, top_p: float):
  """Probabilities (..., V) after temperature and top-k / top-p, as `sample_from_logits`."""
  shape = logits.shape
  logits = logits.reshape(-1, shape[-1]) / max(temperature, 1e-5)
  if top_k > 0 or top_p < 1.0:
    logits = filter_logits(logits, top_k, top_p)
  return jax.nn.softmax(logits, axis=-1).reshape(shape)


def inverse_cdf(probs, uniforms):
  """Ids (...,) drawn from unnormalised probs (..., V) with uniforms (...) in [0, 1)."""
  cdf = jnp.cumsum(probs, axis=-1)
  ids = jnp.sum(cdf < uniforms[..., None] * cdf[..., -1:], axis=-1)
  return jnp.minimum(ids, probs.shape[-1] - 1).astype(jnp.int32)


def verify(p, q, drafts, accept_u, resid_u):
  """Per-row decisions of one round.

  p, q (B, K, V) target / draft probabilities; drafts, accept_u, resid_u (B, K).
  Returns (ids (B, K), accepted (B, K) bool, advance (B,) = the row's first rejection + 1, or
  K): ids[b, j] = the draft if row b accepts it, else the residual draw."""
  pd = jnp.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]
  qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  accepted = accept_u * qd <= pd
  resid = jnp.maximum(p - q, 0.0)
  resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p)
  ids = jnp.where(accepted, drafts, inverse_cdf(resid, resid_u))
  k = drafts.shape[1]
  first_reject = jnp.where(jnp.all(accepted, axis=1), k, jnp.argmin(accepted, axis=1))
  return ids, accepted, jnp.minimum(first_reject + 1, k).astype(jnp.int32)


@dataclasses.dataclass
class SpeculationStats:
  """Per group g of ids: row-ids decided by speculative rounds (`decided`), how many of them
  were the row's accepted draft, and row-rounds (a row's share of a target pass) started in the
  group; `passes` = target passes in all."""
  decided: list
  accepted: list
  row_rounds: list
  passes: int = 0

  def as_dict(self) -> dict:
    def ratio(a, b, nd):
      return [round(x / y, nd) if y else None for x, y in zip(a, b, strict=True)]

    return {'acceptance_per_group': ratio(self.accepted, self.decided, 4),
            'ids_per_row_pass_per_group': ratio(self.decided, self.row_rounds, 3),
            'decided': self.decided, 'accepted': self.accepted, 'row_rounds': self.row_rounds,
            'acceptance': round(sum(self.accepted) / max(1, sum(self.decided)), 4),
            'ids_per_row_pass': round(sum(self.decided) / max(1, sum(self.row_rounds)), 3),
            'target_passes': self.passes}


class SpeculativeSampler:
  """Target `Sampler` + draft `Sampler` (same vocabulary, classes and length); `generate`
  returns a `Generation` with `speculation` (SpeculationStats) set.

  draft_tokens: K ids drafted per round (>= 1); start: first image-id index generated
  speculatively (ids before it by the plain loop; default: the second half); ragged: every row
  advances by its own accepted run (default), else the batch by its first rejection (same
  ids, more passes)."""

  def __init__(self, target: Sampler, draft: Sampler, *, draft_tokens: int = 4,
               start: int | None = None, ragged: bool = True):
    t, d = target.gpt_cfg, draft.gpt_cfg
    if (t.vocab_size, t.block_size, t.num_classes) != (d.vocab_size, d.block_size,
                                                        d.num_classes):
      raise UserError(f'the draft GPT (vocab {d.vocab_size}, {d.block_size} ids, '
                      f'{d.num_classes} classes) does not match the target (vocab '
                      f'{t.vocab_size}, {t.block_size} ids, {t.num_classes} classes); use a '
                      'draft trained on the same tokenizer and classes')
    if draft_tokens < 1:
      raise UserError(f'draft_tokens must be >= 1, got {draft_tokens}')
    L = t.block_size
    start = L // 2 if start is None else int(start)
    if not 1 <= start < L:
      raise UserError(f'speculation start must be an id index in 1..{L - 1}, got {start}')
    self.target, self.draft, self.k, self.start = target, draft, int(draft_tokens), start
    self.ragged = bool(ragged)
    self.cache_len = -(-(L + self.k) // 8) * 8
    self.compiles = collections.Counter()
    self._build()

  def _build(self):
    count = self.compiles
    tgd, dgd = self.target.graphdef, self.draft.graphdef

    def draft_prefill(state, labels, prefix, cache):
      count['draft_prefill'] += 1
      m = nnx.merge(dgd, state)
      _, cache = m.forward(m.embed(labels, prefix), 0, cache)
      return cache

    def rows_of(x, on):
      return jnp.concatenate([x, x]) if on else x

    def draft_round(state, last, pos, cache, scales, uniforms, on, batch, temperature, top_k,
                    top_p):
      """last, pos (B,); scales, uniforms (B, K) -> drafts (B, K), q (B, K, V), cache."""
      count['draft_round'] += 1
      m = nnx.merge(dgd, state)

      def one(carry, xs):
        tok, cache, i = carry
        scale, u = xs
        logits, cache = m.forward(m.embed_tokens(rows_of(tok, on))[:, None],
                                  rows_of(pos, on) + i, cache)
        logits = guide(logits[:, -1], scale[:, None], on, batch)
        d, q = sample_from_logits(logits, u, temperature, top_k, top_p)
        return (d, cache, i + 1), (d, q)

      (_, cache, _), (drafts, q) = jax.lax.scan(one, (last, cache, jnp.int32(0)),
                                                (scales.T, uniforms.T))
      return drafts.T, jnp.swapaxes(q, 0, 1), cache

    def target_round(state, tokens, pos, cache, scales, drafts, q, accept_u, resid_u, on,
                     batch, temperature, top_k, top_p):
      """tokens (B, K) fed at positions pos (B,) + 0..K-1 -> verify(...) + cache."""
      count['verify'] += 1
      m = nnx.merge(tgd, state)
      logits, cache = m.forward(m.embed_tokens(rows_of(tokens, on)), rows_of(pos, on), cache)
      logits = guide(logits, scales[:, :, None], on, batch)            # (B, K, V)
      p = processed_probs(logits, temperature, top_k, top_p)
      ids, accepted, advance = verify(p, q, drafts, accept_u, resid_u)
      return ids, accepted, advance, cache

    static = ('on', 'batch', 'temperature', 'top_k', 'top_p')
    self._draft_prefill = jax.jit(draft_prefill, donate_argnames=('cache',))
    self._draft_round = jax.jit(draft_round, static_argnames=static,
                                donate_argnames=('cache',))
    self._target_round = jax.jit(target_round, static_argnames=static,
                                 donate_argnames=('cache',))

  def _cache(self, sampler: Sampler, rows: int):
    return sampler.gpt_empty_cache(rows, self.cache_len)

  def generate(self, labels, *, key=None, options: SamplingOptions | None = None,
               uniforms=None, accept_uniforms=None, resid_uniforms=None, prefix_ids=None,
               decode: bool = True, noise=None, num_tokens: int | None = None) -> Generation:
    """Ids (B, L) (and the decoded images) as `Sampler.generate`, the ids from `start` on
    drafted and verified. uniforms (B, L): the categorical draws of the plain loop and of the
    draft; accept_uniforms / resid_uniforms (B, L): the acceptance tests and residual draws
    (all three from `key` when not given)."""
    options = options or SamplingOptions()
    tgt = self.target
    cfg = tgt.gpt_cfg
    labels = tgt.checked_labels(labels, options)
    b, L, k = labels.shape[0], cfg.block_size, self.k
    key = jax.random.key(0) if key is None else key
    k_u, k_noise, k_a, k_r = jax.random.split(key, 4)
    draws = []
    for given, kk, name in ((uniforms, k_u, 'uniforms'), (accept_uniforms, k_a,
                                                          'accept_uniforms'),
                            (resid_uniforms, k_r, 'resid_uniforms')):
      arr = np.asarray(jax.random.uniform(kk, (b, L), jnp.float32) if given is None else given,
                       np.float32)
      if arr.shape != (b, L):
        raise UserError(f'{name} must have shape ({b}, {L}), got {arr.shape}')
      draws.append(np.pad(arr, ((0, 0), (0, 2 * k)), constant_values=0.5))
    uniforms, accept_u, resid_u = draws
    prefix = tgt._prefix(prefix_ids, b)
    p_len = prefix.shape[1]
    n_total = L if num_tokens is None else int(num_tokens)
    if not p_len < n_total <= L:
      raise UserError(f'num_tokens must be in {p_len + 1}..{L} (after a {p_len}-id prefix), '
                      f'got {num_tokens}')
    scales, on = cfg_schedule(options.cfg, L)
    scales = np.pad(scales, (0, 2 * k), mode='edge')
    stat = dict(on=on, batch=b, temperature=float(options.temperature),
                top_k=int(options.top_k), top_p=float(options.top_p))
    rows = 2 * b if on else b
    lab = np.concatenate([labels, np.full((b,), cfg.num_classes, np.int32)]) if on else labels
    seq = np.zeros((b, L + 2 * k), np.int32)
    seq[:, :p_len] = prefix
    groups = -(-L // 32)
    q_size = 32
    if tgt.tokenizer is not None:
      q_size = tgt.tokenizer.cfg.queries_per_group
      groups = L // q_size
    stats = SpeculationStats(*([0] * groups for _ in range(3)))
    t_gpt = t_draft = 0.0
    with tgt.precision():
      t0 = time.perf_counter()
      cache = self._cache(tgt, rows)
      pre = np.concatenate([prefix, prefix]) if on else prefix
      ids, cache = tgt._prefill(tgt.state, jnp.asarray(lab), jnp.asarray(pre), cache,
                                jnp.float32(scales[p_len]), jnp.asarray(uniforms[:, p_len]),
                                **stat)
      seq[:, p_len] = np.asarray(ids)
      n = p_len + 1
      switch = min(max(self.start, n), n_total)
      for j in range(n, switch):
        ids, cache = tgt._step(tgt.state, ids, jnp.int32(j), cache, jnp.float32(scales[j]),
                               jnp.asarray(uniforms[:, j]), **stat)
        seq[:, j] = np.asarray(ids)
      n = switch
      t_gpt += time.perf_counter() - t0
      if n < n_total:
        t0 = time.perf_counter()
        known = np.concatenate([seq[:, :n - 1], seq[:, :n - 1]]) if on else seq[:, :n - 1]
        dcache = self._draft_prefill(self.draft.state, jnp.asarray(lab), jnp.asarray(known),
                                     self._cache(self.draft, rows))
        t_draft += time.perf_counter() - t0
      pos = np.full(b, n, np.int64)                 # next undecided id of every row
      cols = np.arange(k)
      while pos.min() < n_total:
        t0 = time.perf_counter()
        at = np.minimum(pos, n_total)               # finished rows idle at the end
        rows_ix = np.arange(b)[:, None]
        last = jnp.asarray(seq[np.arange(b), at - 1])
        idx = at[:, None] + cols                    # (B, K) ids of this round
        sc = jnp.asarray(scales[idx])
        drafts, q, dcache = self._draft_round(
          self.draft.state, last, jnp.asarray(at, jnp.int32), dcache, sc,
          jnp.asarray(uniforms[rows_ix, idx]), **stat)
        drafts.block_until_ready()
        t1 = time.perf_counter()
        tokens = jnp.concatenate([last[:, None], drafts[:, :-1]], axis=1)
        out, accepted, advance, cache = self._target_round(
          tgt.state, tokens, jnp.asarray(at, jnp.int32), cache, sc, drafts, q,
          jnp.asarray(accept_u[rows_ix, idx]), jnp.asarray(resid_u[rows_ix, idx]), **stat)
        out, accepted, advance = np.asarray(out), np.asarray(accepted), np.asarray(advance)
        t_draft += t1 - t0
        t_gpt += time.perf_counter() - t1
        if not self.ragged:                         # the batch to its first rejection
          advance = np.full(b, advance[pos < n_total].min())
        stats.passes += 1
        for r in np.flatnonzero(pos < n_total):
          adv = int(min(advance[r], n_total - pos[r]))
          seq[r, pos[r]:pos[r] + adv] = out[r, :adv]
          stats.row_rounds[min(int(pos[r]) // q_size, groups - 1)] += 1
          for i in range(adv):
            g = min((int(pos[r]) + i) // q_size, groups - 1)
            stats.decided[g] += 1
            stats.accepted[g] += int(accepted[r, i])
          pos[r] += adv
    seq = np.ascontiguousarray(seq[:, :L])
    seq[:, n_total:] = 0
    gen = Generation(ids=seq, seconds={'gpt': t_gpt, 'draft': t_draft, 'decoder': 0.0},
                     num_ids=n_total, speculation=stats.as_dict())
    tok = tgt.tokenizer
    if decode and tok is not None and n_total == L:
      t0 = time.perf_counter()
      if noise is None:
        noise = tok.noise(k_noise, b)
      gen.images = tok.decode(seq, noise)
      gen.seconds['decoder'] = time.perf_counter() - t0
    return gen
