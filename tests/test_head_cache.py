"""LazyMAR's diffusion-head cache (disa_jax/heads/step_cache.py) against a float64 NumPy
re-implementation of the rule written in the official layout (cond rows then uncond rows, the
whole net on [half, half] at refresh steps, caches kept for all rows and sliced to the
conditional half at lazy steps), with injected noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import max_rel_error

from disa_jax.diffusion.ddpm import MODULATION_BUDGET_BYTES, device_tables, p_sample_loop
from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.heads.mlp_adaln import SimpleMLPAdaLN
from disa_jax.heads.step_cache import EARLY, LAZY, REFRESH, step_kinds

CH, WIDTH, ZCH = 4, 32, 12


def _net(depth, seed=0):
  net = SimpleMLPAdaLN(CH, WIDTH, 2 * CH, ZCH, depth, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(net, nnx.Param)):   # no zero-initialised layers;
    scale = 0.02 if path[0] == 'final_layer' else 0.15   # a calm output keeps the chain stable
    v.set_value(jnp.asarray(rng.normal(0, scale, v.shape), jnp.float32))
  return net


def _w(net):
  return {'.'.join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(nnx.state(net, nnx.Param))}


def _lin(w, name, x):
  return x @ w[name + '.kernel'] + w[name + '.bias']


def _silu(x):
  return x / (1 + np.exp(-x))


def _ln(x, w=None, name=None):
  mu = x.mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  return y if w is None else y * w[name + '.scale'] + w[name + '.bias']


class OfficialCachedNet:
  """`SimpleMLPAdaLN.forward` / `forward_with_cfg` with LazyMAR's cache (float64 NumPy)."""

  def __init__(self, w, depth, threshold):
    self.w, self.depth, self.thr = w, depth, threshold
    self.cache = {'blocks': [{} for _ in range(depth)]}

  def _y(self, t, c):
    half = 128
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    e = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    t_emb = _lin(self.w, 'time_embed.mlp.2', _silu(_lin(self.w, 'time_embed.mlp.0', e)))
    return t_emb + _lin(self.w, 'cond_embed', c)

  def _fit(self, a, n):   # the official cache resizing: first n rows, or the cache twice
    return a[:n] if n < len(a) else np.concatenate([a, a]) if n > len(a) else a

  def _block(self, b, x, y, k, n):
    w, pre = self.w, f'res_blocks.{b}'
    shift, scale, gate = np.split(_lin(w, pre + '.adaLN_modulation.1', _silu(y)), 3, -1)
    h = _ln(x, w, pre + '.in_ln') * (1 + scale) + shift
    if k > 0.9 * n or k == n - 1 or k % self.thr == 0:
      self.cache['blocks'][b]['mlp'] = _lin(w, pre + '.mlp.2', _silu(_lin(w, pre + '.mlp.0', h)))
    return x + gate * self._fit(self.cache['blocks'][b]['mlp'], len(x))

  def forward(self, x, t, c, k, n):
    w = self.w
    x = _lin(w, 'input_proj', x)
    y = self._y(t, c)
    refresh = k == n - 1 or k % self.thr == 0
    last = None
    for b in range(self.depth):
      if refresh:
        x = self._block(b, x, y, k, n)
        if b in (1, 2, 3, 4):
          self.cache['blocks'][b]['delta'] = x - last
      elif b in (1, 2, 3, 4):
        x = last + self._fit(self.cache['blocks'][b]['delta'], len(last))
      else:
        x = self._block(b, x, y, k, n)
      last = x
    shift, scale = np.split(_lin(w, 'final_layer.adaLN_modulation.1', _silu(y)), 2, -1)
    return _lin(w, 'final_layer.linear', _ln(x) * (1 + scale) + shift)

  def forward_with_cfg(self, x, t, c, cfg, k, n):
    half = x[: len(x) // 2]
    if k == n - 1 or k % self.thr == 0:
      out = self.forward(np.concatenate([half, half]), t, c, k, n)
      eps, rest = out[:, :CH], out[:, CH:]
      cond, uncond = np.split(eps, 2)
      self.cache['cfg'] = cond - uncond
    else:
      r = len(half)
      out = self.forward(half, t[:r], c[:r], k, n)
      cond, rest = out[:, :CH], out[:, CH:]
      uncond = cond - self.cache['cfg']
      rest = np.concatenate([rest, rest])
    g = uncond + cfg * (cond - uncond)
    return np.concatenate([np.concatenate([g, g]), rest], 1)


def _official_loop(net, z, x, noise, num_steps, cfg, max_timestep, threshold, depth):
  """The official ancestral loop (learned-range variance) over the cached net."""
  sched = spaced_schedule(num_steps, max_timestep)
  tb, n = sched.tables, sched.num_steps
  ref = OfficialCachedNet(_w(net), depth, threshold)
  x = np.asarray(x, np.float64)
  rows = len(x)
  if cfg != 1.0:
    x = np.concatenate([x, x])
  z = np.asarray(z, np.float64)
  for i, k in enumerate(reversed(range(n))):
    t = np.full((len(x),), sched.timesteps[k], np.float64)
    out = (ref.forward_with_cfg(x, t, z, cfg, k, n) if cfg != 1.0
           else ref.forward(x, t, z, k, n))
    eps, v = out[:, :CH], out[:, CH:]
    frac = (v + 1) / 2
    logvar = frac * np.log(tb.betas[k]) + (1 - frac) * tb.posterior_log_variance_clipped[k]
    x0 = tb.sqrt_recip_alphas_cumprod[k] * x - tb.sqrt_recipm1_alphas_cumprod[k] * eps
    mean = tb.posterior_mean_coef1[k] * x0 + tb.posterior_mean_coef2[k] * x
    e = np.asarray(noise[i], np.float64)
    if cfg != 1.0:
      e = np.concatenate([e, 0 * e + 7.0])   # the uncond half of x is never used
    x = mean + (k != 0) * np.exp(0.5 * logvar) * e
  return x[:rows]


def test_step_kinds():
  # A = 50: refresh at k = 49, 42, ..., 0; k = 48, 47, 46 (> 45) recompute the MLPs
  kinds = step_kinds(50, 7)
  k = np.arange(50)[::-1]
  assert set(k[kinds == REFRESH]) == {49, 42, 35, 28, 21, 14, 7, 0}
  assert set(k[kinds == EARLY]) == {48, 47, 46}
  assert (kinds == LAZY).sum() == 39
  assert list(step_kinds(5, 7)) == [REFRESH, LAZY, LAZY, LAZY, REFRESH]
  assert (step_kinds(7, 7) == REFRESH).sum() == 2 and (step_kinds(1, 7) == REFRESH).all()


def _run(net, z, zc_rows, x, noise, steps, cfg, threshold, budget, pad_to=None):
  zc, zu = (z[:zc_rows], z[zc_rows:]) if cfg != 1.0 else (z, None)
  tables = device_tables(steps, 950, pad_to=pad_to)
  a_static = pad_to or spaced_schedule(steps, 950).num_steps   # the clamp may drop a step
  with jax.default_matmul_precision('highest'):
    return p_sample_loop(net, zc, zu, x, tables, num_steps=a_static, cfg=jnp.float32(cfg),
                         temperature=jnp.float32(1.0), noise_at=lambda j: noise[j],
                         modulation_budget=budget, head_cache=threshold)


@pytest.mark.parametrize('budget', [MODULATION_BUDGET_BYTES, 0], ids=['precomputed', 'per_step'])
@pytest.mark.parametrize('depth,steps,cfg', [(6, 50, 3.0), (6, 12, 1.0), (3, 9, 2.0),
                                             (8, 20, 2.5)])
def test_head_cache_matches_official_rule(depth, steps, cfg, budget):
  net = _net(depth, seed=depth + steps)
  rng = np.random.default_rng(steps)
  r = 5
  z = jnp.asarray(rng.normal(size=(2 * r if cfg != 1.0 else r, ZCH)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(r, CH)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(steps, r, CH)), jnp.float32)
  want = _official_loop(net, z, x, noise, steps, cfg, 950, 7, depth)
  got = _run(net, z, r, x, noise, steps, cfg, 7, budget)
  assert np.abs(want).max() > 0.5
  assert max_rel_error(got, want) < 1e-5, max_rel_error(got, want)
  # the cache changes the result (it is really used) ...
  plain = _run(net, z, r, x, noise, steps, cfg, 0, budget)
  assert max_rel_error(plain, want) > 1e-3
  # ... and refreshing at every step (threshold 1) is the uncached loop
  every = _run(net, z, r, x, noise, steps, cfg, 1, budget)
  assert max_rel_error(every, plain) < 1e-6


def test_head_cache_traced_trip_count():
  """A traced trip count (tables padded to a longer chain) reads k and A at run time."""
  net = _net(6, seed=3)
  rng = np.random.default_rng(0)
  r, steps, pad = 3, 11, 16
  z = jnp.asarray(rng.normal(size=(2 * r, ZCH)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(r, CH)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(steps, r, CH)), jnp.float32)
  want = _official_loop(net, z, x, noise, steps, 2.0, 950, 7, 6)
  got = _run(net, z, r, x, noise, steps, 2.0, 7, MODULATION_BUDGET_BYTES, pad_to=pad)
  assert max_rel_error(got, want) < 1e-5, max_rel_error(got, want)
