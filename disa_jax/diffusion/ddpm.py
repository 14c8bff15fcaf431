"""The diffusion head's ancestral sampling loop (`p_sample_loop` of LTH14/mar), in JAX.

For R token rows with condition z (and, under CFG, the unconditional condition z_u):
  x <- xi ~ N(0, I)                                   (not scaled by temperature)
  for k = A-1 .. 0 (respaced index; the net sees the original timestep t_k):
    [eps, v] = net(x, t_k, z)
    CFG: the net sees x twice with conditions (z, z_u); eps = eps_u + s (eps_c - eps_u);
         v comes from the conditional branch (the official code's kept half)
    log var = (v+1)/2 log beta'_k + (1 - (v+1)/2) log sigma~^2_k      (learned range)
    x0 = sqrt(1/abar'_k) x - sqrt(1/abar'_k - 1) eps                   (no clipping)
    x  = c1_k x0 + c2_k x + 1[k>0] exp(log var / 2) * temperature * n,  n ~ N(0, I)

The official code also evolves the unconditional half of x, but never feeds it back to the
net and discards it; this loop skips it. The time embedding depends only on k and the
condition embedding only on the row, so both are computed once per call rather than per row
and per step (same numbers, fewer FLOPs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from disa_jax.diffusion.gaussian import spaced_schedule

TABLE_KEYS = ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'coef1', 'coef2', 'log_beta',
              'post_logvar', 'noise_mask')


def device_tables(num_steps: int, max_timestep: int | None) -> dict[str, jax.Array]:
  """float32 coefficient tables [A] of the respaced chain, in sampling order."""
  return {k: jnp.asarray(v) for k, v in spaced_schedule(num_steps, max_timestep)
          .sampling_tables().items()}


# Largest buffer of precomputed adaLN modulations (all steps x rows) per head call.
MODULATION_BUDGET_BYTES = 256 * 2**20


def _step_fn(net, z, z_uncond, tables, *, num_steps: int, cfg, temperature, noise_at,
             channels: int, modulation_budget: int):
  """body(i, x) -> x after loop iteration i (i = 0 is the noisiest step).

  When the adaLN modulations of all A steps fit in `modulation_budget` bytes they are
  computed here in one batched pass (same arithmetic; at small batch the loop is bound by
  reading weights, and this reads ~60% of them once instead of A times).
  """
  c = channels
  r = z.shape[0]
  t_emb = net.embed_time(tables['t'])                         # [A, W]
  if z_uncond is None:
    cond = net.embed_cond(z)                                  # [R, W]
  else:
    cond = jnp.stack([net.embed_cond(z), net.embed_cond(z_uncond)], axis=1).reshape(2 * r, -1)
  rows = cond.shape[0]
  precompute = num_steps * rows * net.modulation_width() * 4 <= modulation_budget
  if precompute:
    mods_all = net.modulations(cond[None] + t_emb[:, None])   # each [A, rows, k*W]

  def trunk(i, x_in):
    if precompute:
      return net.trunk_modulated(x_in, tuple(m[i] for m in mods_all))
    return net.trunk(x_in, cond + t_emb[i])

  def body(i, x):
    if z_uncond is None:
      out = trunk(i, x)
      eps, v = out[:, :c], out[:, c:]
    else:
      out = trunk(i, jnp.repeat(x, 2, axis=0)).reshape(r, 2, 2 * c)
      eps_c, eps_u = out[:, 0, :c], out[:, 1, :c]
      eps = eps_u + cfg * (eps_c - eps_u)
      v = out[:, 0, c:]
    frac = (v + 1) / 2
    log_var = frac * tables['log_beta'][i] + (1 - frac) * tables['post_logvar'][i]
    x0 = tables['sqrt_recip_ac'][i] * x - tables['sqrt_recipm1_ac'][i] * eps
    mean = tables['coef1'][i] * x0 + tables['coef2'][i] * x
    scale = tables['noise_mask'][i] * temperature
    return mean + scale * jnp.exp(0.5 * log_var) * noise_at(i)

  return body


def p_sample_loop(net, z, z_uncond, x, tables, *, num_steps: int, cfg, temperature, noise_at,
                  modulation_budget: int = MODULATION_BUDGET_BYTES):
  """Runs the loop for rows x [R, C] with conditions z [R, Dz] (z_uncond [R, Dz] or None).

  `tables` hold [A] arrays (A = num_steps, static); `noise_at(i)` returns the [R, C] noise of
  loop iteration i (i = 0 is the noisiest step). Returns x_0 [R, C] (float32).
  """
  body = _step_fn(net, z, z_uncond, tables, num_steps=num_steps, cfg=cfg,
                  temperature=temperature, noise_at=noise_at, channels=x.shape[-1],
                  modulation_budget=modulation_budget)
  return jax.lax.fori_loop(0, num_steps, body, x.astype(jnp.float32))


def p_sample_trajectory(net, z, z_uncond, x, tables, *, num_steps: int, cfg, temperature,
                        noise_at, modulation_budget: int = MODULATION_BUDGET_BYTES):
  """`p_sample_loop` that also returns every intermediate state: [A + 1, R, C] with x_T first
  and x_0 last (same numbers; for analysis only, the sampler uses `p_sample_loop`)."""
  body = _step_fn(net, z, z_uncond, tables, num_steps=num_steps, cfg=cfg,
                  temperature=temperature, noise_at=noise_at, channels=x.shape[-1],
                  modulation_budget=modulation_budget)
  x = x.astype(jnp.float32)

  def scan_body(x, i):
    x = body(i, x)
    return x, x

  _, states = jax.lax.scan(scan_body, x, jnp.arange(num_steps))
  return jnp.concatenate([x[None], states], axis=0)


def _row_normal(keys, stream, channels):
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), (channels,)))(keys)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_steps', 'use_cfg',
                                             'modulation_budget'))
def _sample_head_jit(state, z, key, tables, cfg, temperature, *, graphdef, num_steps, use_cfg,
                     modulation_budget):
  model = nnx.merge(graphdef, state)
  net = model.diffloss.net if hasattr(model, 'diffloss') else model
  channels = net.in_channels
  if use_cfg:
    n = z.shape[0] // 2
    zc, zu = z[:n], z[n:]
  else:
    n, zc, zu = z.shape[0], z, None
  row_keys = jax.random.split(key, n)
  x = _row_normal(row_keys, 0, channels)
  noise_at = lambda i: _row_normal(row_keys, i + 1, channels)  # noqa: E731
  return p_sample_loop(net, zc, zu, x, tables, num_steps=num_steps, cfg=cfg,
                       temperature=temperature, noise_at=noise_at,
                       modulation_budget=modulation_budget)


def sample_head(model, z, key, *, num_steps: int, temperature: float = 1.0, cfg: float = 1.0,
                max_timestep: int | None = None,
                modulation_budget: int = MODULATION_BUDGET_BYTES):
  """Samples N tokens [N, C] from the diffusion head given conditions z.

  `model` is a MAR (or a bare `SimpleMLPAdaLN`); z is [N, Dd], or [2N, Dd] under CFG
  (cfg != 1.0: conditional rows first, unconditional second, as the official code).
  `num_steps` is the requested respacing; `max_timestep` the DiSA clamp (950) or None.
  Row i uses noise derived from `jax.random.split(key, N)[i]`. `modulation_budget` (bytes)
  bounds the precomputed adaLN modulations; 0 forces the per-step path (same numbers).
  """
  z = jnp.asarray(z)
  if z.ndim != 2:
    raise ValueError(f'z must be [N, D] (or [2N, D] under CFG), got shape {z.shape}')
  use_cfg = cfg != 1.0
  if use_cfg and z.shape[0] % 2:
    raise ValueError(f'under CFG z needs 2N rows (cond then uncond), got {z.shape[0]}')
  sched = spaced_schedule(int(num_steps), max_timestep)
  graphdef, state = nnx.split(model)
  return _sample_head_jit(state, z, key, device_tables(int(num_steps), max_timestep),
                          jnp.float32(cfg), jnp.float32(temperature), graphdef=graphdef,
                          num_steps=sched.num_steps, use_cfg=use_cfg,
                          modulation_budget=int(modulation_budget))
