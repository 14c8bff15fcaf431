"""LazyMAR's diffusion-head cache (feihongyan1/LazyMAR models/diffloss_cached.py) for the MAR head.

Within one head call (A denoising steps of the same token rows) the residual updates of the
MLP head and the CFG guidance difference change little from step to step. With threshold T
(LazyMAR: 7), the step with respaced index k (A-1 first, 0 last) is

- a refresh step when k == A-1 or k % T == 0: the whole net on both CFG branches, as without
  the cache. For the conditional rows it stores each block's MLP output, the residual update
  (output - input) of blocks 1..4, and eps_cond - eps_uncond;
- otherwise a lazy step, on the conditional branch only: blocks 1..4 add their stored update;
  every other block computes its adaLN modulation for the new timestep but reuses the stored
  MLP output (x + gate * mlp), except while k > 0.9 A, where it recomputes (and stores) it;
  the final layer runs as usual; eps_uncond = eps_cond - stored difference, then the usual
  guidance. The variance channels come from the conditional branch, as without the cache.

So a lazy step costs the input projection, the final layer and the modulations of the
non-skipped blocks for half the rows. The rule reads only k and A, which are static for a
fixed step count (the refresh / lazy modulations are then precomputed, as the uncached loop
does) and traced under a traced trip count (then computed per step). `step_kinds` gives the
per-iteration kinds for analysis and FLOP counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SKIPPED_BLOCKS = (1, 2, 3, 4)   # blocks whose whole update is reused (official hard-coded set)
REFRESH, EARLY, LAZY = 0, 1, 2  # step kinds: full net / cond branch, MLP recomputed / reused


def step_kinds(num_steps: int, threshold: int) -> np.ndarray:
  """Kind of each loop iteration i (respaced index k = A-1-i) of an A-step chain, int32 [A]."""
  k = np.arange(num_steps)[::-1]
  return np.asarray(_kind(k, num_steps, threshold, np), np.int32)


def _kind(k, n, threshold: int, xp):
  refresh = (k == n - 1) | (k % threshold == 0)
  early = 10 * k > 9 * n             # k > 0.9 n, exactly for integers
  return xp.where(refresh, REFRESH, xp.where(early, EARLY, LAZY))


def block_split(depth: int) -> tuple[list[int], list[int]]:
  """(blocks that run at lazy steps, blocks whose stored update is added) for a depth."""
  return ([b for b in range(depth) if b not in SKIPPED_BLOCKS],
          [b for b in range(depth) if b in SKIPPED_BLOCKS])


def cached_predictor(net, cond_all, t_emb, *, use_cfg: bool, threshold: int, cfg,
                     channels: int, num_steps: int, trip=None, modulation_budget: int):
  """(initial cache, predict(i, x, cache) -> (eps, v, cache)) for the head loop.

  cond_all: condition embeddings, [R, W], or [2R, W] under CFG with each row's cond and
  uncond rows interleaved (the uncached loop's layout); t_emb [A, W] the time embedding per
  loop iteration; x [R, C] the conditional rows' state. `trip` (traced int32 or None) is the
  number of steps actually run (iterations A - trip .. A - 1).
  """
  reuse, skip = block_split(len(net.res_blocks))
  blocks, final = net.res_blocks, net.final_layer
  cond_rows = slice(None, None, 2) if use_cfg else slice(None)   # the conditional rows
  cond_c = cond_all[cond_rows]
  r, c = cond_c.shape[0], channels
  width = t_emb.shape[-1]

  def lazy_mods(y):
    return tuple(blocks[b].modulation(y) for b in reuse) + (final.modulation(y),)

  kinds = None if trip is not None else step_kinds(num_steps, threshold)
  precompute = False
  if kinds is not None:
    n_ref = int((kinds == REFRESH).sum())
    lazy_width = len(reuse) * 3 * width + 2 * width
    size = 4 * (n_ref * cond_all.shape[0] * net.modulation_width()
                + (num_steps - n_ref) * r * lazy_width)
    precompute = size <= modulation_budget
  if precompute:
    ref_idx, lazy_idx = np.where(kinds == REFRESH)[0], np.where(kinds != REFRESH)[0]
    pos = np.zeros(num_steps, np.int32)
    pos[ref_idx], pos[lazy_idx] = np.arange(len(ref_idx)), np.arange(len(lazy_idx))
    pos = jnp.asarray(pos)
    ref_mods = net.modulations(cond_all[None] + t_emb[ref_idx][:, None])
    lz_mods = lazy_mods(cond_c[None] + t_emb[lazy_idx][:, None]) if len(lazy_idx) else None

  def refresh(i, x, cache):
    xx = jnp.repeat(x, 2, axis=0) if use_cfg else x
    mods = (tuple(m[pos[i]] for m in ref_mods) if precompute
            else net.modulations(cond_all + t_emb[i]))
    h = net.input_proj(xx).astype(jnp.float32)
    mlp, delta = list(cache['mlp']), list(cache['delta'])
    for b, (block, mod) in enumerate(zip(blocks, mods[:-1], strict=True)):
      out, gate = block.branch(h, mod)
      new = h + (gate * out).astype(h.dtype)
      if b in SKIPPED_BLOCKS:
        delta[skip.index(b)] = (new - h)[cond_rows]
      else:
        mlp[reuse.index(b)] = out[cond_rows].astype(cache['mlp'].dtype)
      h = new
    out = final.apply(h, mods[-1]).astype(jnp.float32)
    cache = dict(cache, mlp=jnp.stack(mlp), delta=jnp.stack(delta) if skip else cache['delta'])
    if not use_cfg:
      return out[:, :c], out[:, c:], cache
    out = out.reshape(r, 2, 2 * c)
    eps_c, eps_u = out[:, 0, :c], out[:, 1, :c]
    cache['cfg'] = eps_c - eps_u
    return eps_u + cfg * (eps_c - eps_u), out[:, 0, c:], cache

  def lazy(early):
    def fn(i, x, cache):
      mods = (tuple(m[pos[i]] for m in lz_mods) if precompute
              else lazy_mods(cond_c + t_emb[i]))
      h = net.input_proj(x).astype(jnp.float32)
      mlp = cache['mlp']
      for b, block in enumerate(blocks):
        if b in SKIPPED_BLOCKS:
          h = h + cache['delta'][skip.index(b)]
          continue
        j = reuse.index(b)
        if early:
          out, gate = block.branch(h, mods[j])
          mlp = mlp.at[j].set(out.astype(mlp.dtype))
        else:
          out, gate = mlp[j], jnp.split(mods[j], 3, axis=-1)[2]
        h = h + (gate * out).astype(h.dtype)
      out = final.apply(h, mods[-1]).astype(jnp.float32)
      cache = dict(cache, mlp=mlp)
      eps_c, v = out[:, :c], out[:, c:]
      if not use_cfg:
        return eps_c, v, cache
      eps_u = eps_c - cache['cfg']
      return eps_u + cfg * (eps_c - eps_u), v, cache
    return fn

  # MLP outputs are kept in the modulation dtype (the block's compute dtype)
  mod_dtype = jax.eval_shape(blocks[0].modulation, cond_c[:1]).dtype   # block 0 always runs
  init = {'mlp': jnp.zeros((len(reuse), r, width), mod_dtype),
          'delta': jnp.zeros((len(skip), r, width), jnp.float32)}
  if use_cfg:
    init['cfg'] = jnp.zeros((r, c), jnp.float32)
  branches = [refresh, lazy(True), lazy(False)]
  if precompute and lz_mods is None:   # every step refreshes (e.g. A = 1)
    branches = [refresh] * 3

  def predict(i, x, cache):
    if kinds is not None:
      kind = jnp.asarray(kinds)[i]
    else:
      kind = _kind(num_steps - 1 - i, trip, threshold, jnp)
    return jax.lax.switch(kind, branches, i, x, cache)

  return init, predict
