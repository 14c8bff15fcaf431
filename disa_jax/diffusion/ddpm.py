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

Other solvers over the same respaced chain (`solver`, static; CFG is applied to the eps
channels exactly as above, the learned-variance channels are unused):
  ddim (eta):  a = abar'_k, a' = abar'_{k-1} (1 at k = 0),
               sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')
               x = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + 1[k>0] sigma * temperature * n
               (guided-diffusion `ddim_sample` without clipping, where its re-derived eps is eps)
  dpmpp_2m:    DPM-Solver++(2M) in data prediction, lambda = log(sqrt(a) / sqrt(1 - a)),
               step k -> k-1 with h = lambda' - lambda, r = h_prev / h:
               D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k+1}   (D = x0_k at the first step)
               x = (sigma'/sigma) x - alpha' (exp(-h) - 1) D;  the last step (k = 0) returns
               x0_0 (lower order final: its target is the clean sample). Deterministic.
  dpmpp_2m_sde: DPM-Solver++(2M) SDE (Lu et al. 2022, the stochastic data-prediction
               multistep solver), same h, r and D, and the same final step:
               x = (sigma'/sigma) exp(-h) x + alpha' (1 - exp(-2h)) D
                   + 1[k>0] sigma' sqrt(1 - exp(-2h)) * temperature * n
  ddpm_2m:     the official ancestral step (learned-range variance, same noise) with its x0
               replaced by the second-order multistep data prediction D of dpmpp_2m (first and
               last steps first order): mean = c1_k D + c2_k x. Its first-order form is
               exactly `ddpm`; with the posterior variance instead of the learned one it would
               be dpmpp_2m_sde (whose first-order step is DDPM's mean with that variance).
Every solver spends A = num_steps network evaluations per token.

Traced trip count: when the tables carry a 'trip' entry (int32 scalar, see
`device_tables(pad_to=...)`), they are front-padded to the static length num_steps and the
loop runs iterations num_steps - trip .. num_steps - 1, so one executable serves every step
count up to num_steps (noise index and solver state as for an unpadded chain of trip steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.heads.step_cache import cached_predictor

TABLE_KEYS = ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'coef1', 'coef2', 'log_beta',
              'post_logvar', 'noise_mask')
SOLVERS = ('ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', 'ddpm_2m')
SOLVER_KEYS = {
  'ddpm': TABLE_KEYS,
  'ddim': ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'ddim_x0', 'ddim_eps', 'ddim_sigma'),
  'dpmpp_2m': ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'dpm_x', 'dpm_x0', 'dpm_x0_prev'),
  'dpmpp_2m_sde': ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac', 'dpm_x', 'dpm_x0', 'dpm_x0_prev',
                   'dpm_noise'),
  'ddpm_2m': TABLE_KEYS + ('d2_x0', 'd2_prev'),
}


def check_solver(solver: str, eta: float = 0.0) -> None:
  if solver not in SOLVERS:
    raise ValueError(f'unknown head solver {solver!r}; choose one of {", ".join(SOLVERS)}')
  if not (np.isfinite(eta) and eta >= 0):
    raise ValueError(f'DDIM eta must be finite and >= 0, got {eta}')


def solver_tables(num_steps: int, max_timestep: int | None, solver: str = 'ddpm',
                  eta: float = 0.0) -> dict[str, np.ndarray]:
  """float32 per-iteration coefficients [A] of `solver` on the respaced chain, sampling order
  (iteration i = respaced index k = A-1-i)."""
  check_solver(solver, eta)
  sched = spaced_schedule(num_steps, max_timestep)
  base = sched.sampling_tables()
  if solver == 'ddpm':
    return base
  a = sched.tables.alphas_cumprod[::-1]                      # abar'_k, float64
  w0, w1 = _second_order_weights(a)
  if solver == 'ddpm_2m':
    return {**base, 'd2_x0': w0.astype(np.float32), 'd2_prev': w1.astype(np.float32)}
  out = {k: base[k] for k in ('t', 'sqrt_recip_ac', 'sqrt_recipm1_ac')}
  a_next = sched.tables.alphas_cumprod_prev[::-1]            # abar'_{k-1} (1 after k = 0)
  if solver == 'ddim':
    sigma = eta * np.sqrt((1 - a_next) / (1 - a)) * np.sqrt(1 - a / a_next)
    out['ddim_x0'] = np.sqrt(a_next)
    out['ddim_eps'] = np.sqrt(np.maximum(1 - a_next - sigma**2, 0.0))
    out['ddim_sigma'] = sigma * (np.arange(len(a))[::-1] != 0)
  else:
    sde = solver == 'dpmpp_2m_sde'
    sig = np.sqrt(1 - a)
    lam = 0.5 * np.log(a / (1 - a))
    n = len(a)
    dx, dx0, dprev, dnoise = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
      if i == n - 1:                 # last step: the target is the clean sample
        dx0[i] = 1.0
        continue
      h = lam[i + 1] - lam[i]
      sig_next = np.sqrt(1 - a_next[i])
      if sde:                        # alpha' (1 - exp(-2h)); (sigma'/sigma) exp(-h)
        phi = -np.sqrt(a_next[i]) * np.expm1(-2 * h)
        dx[i] = sig_next / sig[i] * np.exp(-h)
        dnoise[i] = sig_next * np.sqrt(-np.expm1(-2 * h))
      else:                          # -alpha' (exp(-h) - 1); sigma'/sigma
        phi = -np.sqrt(a_next[i]) * np.expm1(-h)
        dx[i] = sig_next / sig[i]
      dx0[i], dprev[i] = phi * w0[i], phi * w1[i]
    out.update(dpm_x=dx, dpm_x0=dx0, dpm_x0_prev=dprev)
    if sde:
      out['dpm_noise'] = dnoise
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _second_order_weights(a) -> tuple[np.ndarray, np.ndarray]:
  """(w0, w1) [A], float64: D = w0 x0_k + w1 x0_{k+1} is DPM-Solver++(2M)'s data prediction
  (r = h_prev / h in lambda = log(alpha / sigma)) at each iteration of the chain abar'_k `a`
  [A] (sampling order); the first and last iterations are first order (D = x0_k)."""
  lam = 0.5 * np.log(a / (1 - a))
  n = len(a)
  w0, w1 = np.ones(n), np.zeros(n)
  for i in range(1, n - 1):
    r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    w0[i], w1[i] = 1 + 1 / (2 * r), -1 / (2 * r)
  return w0, w1


def device_tables(num_steps: int, max_timestep: int | None, solver: str = 'ddpm',
                  eta: float = 0.0, pad_to: int | None = None) -> dict[str, jax.Array]:
  """float32 coefficient tables [A] of the respaced chain, in sampling order.

  With `pad_to` (>= A) every table is front-padded (edge values) to that length and the
  dict gains 'trip' = A (int32): the loop then runs a traced number of steps (module doc)."""
  tables = solver_tables(num_steps, max_timestep, solver, eta)
  if pad_to is None:
    return {k: jnp.asarray(v) for k, v in tables.items()}
  n = len(tables['t'])
  if pad_to < n:
    raise ValueError(f'pad_to={pad_to} is shorter than the chain ({n} steps)')
  out = {k: jnp.asarray(np.pad(v, (pad_to - n, 0), mode='edge')) for k, v in tables.items()}
  out['trip'] = jnp.int32(n)
  return out


# Largest buffer of precomputed adaLN modulations (all steps x rows) per head call.
MODULATION_BUDGET_BYTES = 256 * 2**20


def _solver_of(tables) -> str:
  for name in ('ddpm_2m', 'dpmpp_2m_sde', 'dpmpp_2m', 'ddim'):
    if SOLVER_KEYS[name][-1] in tables:
      return name
  return 'ddpm'


def _step_fn(net, z, z_uncond, tables, *, num_steps: int, cfg, temperature, noise_at,
             channels: int, modulation_budget: int, head_cache: int = 0):
  """(initial state, body(i, (x, x0_prev, cache), j) -> state after loop iteration i) (tables
  index i; noise index j, j = 0 is the noisiest step of the chain; the state's x is set by the
  caller). The solver is read from the table keys. `head_cache` > 0 evaluates the net with
  LazyMAR's head cache of that threshold (`heads/step_cache.py`; cache () when 0).

  When the adaLN modulations of all A steps fit in `modulation_budget` bytes they are
  computed here in one batched pass (same arithmetic; at small batch the loop is bound by
  reading weights, and this reads ~60% of them once instead of A times). Not with a traced
  trip count (that would compute them for the padded length).
  """
  c = channels
  r = z.shape[0]
  solver = _solver_of(tables)
  t_emb = net.embed_time(tables['t'])                         # [A, W]
  if z_uncond is None:
    cond = net.embed_cond(z)                                  # [R, W]
  else:
    cond = jnp.stack([net.embed_cond(z), net.embed_cond(z_uncond)], axis=1).reshape(2 * r, -1)
  if head_cache:
    init, predict = cached_predictor(
      net, cond, t_emb, use_cfg=z_uncond is not None, threshold=head_cache, cfg=cfg,
      channels=c, num_steps=num_steps, trip=tables.get('trip'),
      modulation_budget=modulation_budget)
  else:
    init, predict = (), _predictor(net, cond, t_emb, tables, num_steps=num_steps, cfg=cfg,
                                   channels=c, rows=r, use_cfg=z_uncond is not None,
                                   modulation_budget=modulation_budget)

  def body(i, state, j):
    x, x0_prev, cache = state
    eps, v, cache = predict(i, x, cache)
    x0 = tables['sqrt_recip_ac'][i] * x - tables['sqrt_recipm1_ac'][i] * eps
    if solver == 'ddim':
      mean = tables['ddim_x0'][i] * x0 + tables['ddim_eps'][i] * eps
      return mean + tables['ddim_sigma'][i] * temperature * noise_at(j), x0_prev, cache
    if solver in ('dpmpp_2m', 'dpmpp_2m_sde'):
      new = (tables['dpm_x'][i] * x + tables['dpm_x0'][i] * x0
             + tables['dpm_x0_prev'][i] * x0_prev)
      if solver == 'dpmpp_2m_sde':
        new = new + tables['dpm_noise'][i] * temperature * noise_at(j)
      return new, x0, cache
    frac = (v + 1) / 2
    log_var = frac * tables['log_beta'][i] + (1 - frac) * tables['post_logvar'][i]
    d = x0
    if solver == 'ddpm_2m':
      d = tables['d2_x0'][i] * x0 + tables['d2_prev'][i] * x0_prev
      x0_prev = x0
    mean = tables['coef1'][i] * d + tables['coef2'][i] * x
    scale = tables['noise_mask'][i] * temperature
    return mean + scale * jnp.exp(0.5 * log_var) * noise_at(j), x0_prev, cache

  return init, body


def _predictor(net, cond, t_emb, tables, *, num_steps, cfg, channels, rows, use_cfg,
               modulation_budget):
  """predict(i, x, ()) -> (guided eps, v, ()) of the uncached net at loop iteration i."""
  c, r = channels, rows
  precompute = ('trip' not in tables
                and num_steps * cond.shape[0] * net.modulation_width() * 4 <= modulation_budget)
  if precompute:
    mods_all = net.modulations(cond[None] + t_emb[:, None])   # each [A, rows, k*W]

  def trunk(i, x_in):
    if precompute:
      return net.trunk_modulated(x_in, tuple(m[i] for m in mods_all))
    return net.trunk(x_in, cond + t_emb[i])

  def predict(i, x, cache):
    if not use_cfg:
      out = trunk(i, x)
      return out[:, :c], out[:, c:], cache
    out = trunk(i, jnp.repeat(x, 2, axis=0)).reshape(r, 2, 2 * c)
    eps_c, eps_u = out[:, 0, :c], out[:, 1, :c]
    return eps_u + cfg * (eps_c - eps_u), out[:, 0, c:], cache

  return predict


def _loop_bounds(tables, num_steps: int):
  if 'trip' in tables:
    return num_steps - tables['trip'], num_steps
  return 0, num_steps


def p_sample_loop(net, z, z_uncond, x, tables, *, num_steps: int, cfg, temperature, noise_at,
                  modulation_budget: int = MODULATION_BUDGET_BYTES, head_cache: int = 0):
  """Runs the loop for rows x [R, C] with conditions z [R, Dz] (z_uncond [R, Dz] or None).

  `tables` hold [A] arrays (A = num_steps, static; `device_tables`, any solver); `noise_at(j)`
  returns the [R, C] noise of loop iteration j (j = 0 is the noisiest step). `head_cache`:
  LazyMAR's head-cache threshold (0: off, every step runs the whole net). Returns x_0
  [R, C] (float32).
  """
  cache, body = _step_fn(net, z, z_uncond, tables, num_steps=num_steps, cfg=cfg,
                         temperature=temperature, noise_at=noise_at, channels=x.shape[-1],
                         modulation_budget=modulation_budget, head_cache=head_cache)
  x = x.astype(jnp.float32)
  start, stop = _loop_bounds(tables, num_steps)
  if 'trip' not in tables:
    return jax.lax.fori_loop(0, num_steps, lambda i, s: body(i, s, i), (x, x, cache))[0]
  return jax.lax.fori_loop(start, stop, lambda i, s: body(i, s, i - start), (x, x, cache))[0]


def p_sample_trajectory(net, z, z_uncond, x, tables, *, num_steps: int, cfg, temperature,
                        noise_at, modulation_budget: int = MODULATION_BUDGET_BYTES,
                        head_cache: int = 0):
  """`p_sample_loop` that also returns every intermediate state: [A + 1, R, C] with x_T first
  and x_0 last (same numbers; for analysis only, the sampler uses `p_sample_loop`)."""
  if 'trip' in tables:
    raise ValueError('p_sample_trajectory needs unpadded tables (device_tables without pad_to)')
  cache, body = _step_fn(net, z, z_uncond, tables, num_steps=num_steps, cfg=cfg,
                         temperature=temperature, noise_at=noise_at, channels=x.shape[-1],
                         modulation_budget=modulation_budget, head_cache=head_cache)
  x = x.astype(jnp.float32)

  def scan_body(state, i):
    state = body(i, state, i)
    return state, state[0]

  _, states = jax.lax.scan(scan_body, (x, x, cache), jnp.arange(num_steps))
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
                max_timestep: int | None = None, solver: str = 'ddpm', eta: float = 0.0,
                modulation_budget: int = MODULATION_BUDGET_BYTES):
  """Samples N tokens [N, C] from the diffusion head given conditions z.

  `model` is a MAR (or a bare `SimpleMLPAdaLN`); z is [N, Dd], or [2N, Dd] under CFG
  (cfg != 1.0: conditional rows first, unconditional second, as the official code).
  `num_steps` is the requested respacing; `max_timestep` the DiSA clamp (950) or None.
  `solver`: 'ddpm' (official ancestral sampler), 'ddim' (with `eta`), 'dpmpp_2m',
  'dpmpp_2m_sde' or 'ddpm_2m' (module docstring).
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
  tables = device_tables(int(num_steps), max_timestep, solver, float(eta))
  return _sample_head_jit(state, z, key, tables, jnp.float32(cfg), jnp.float32(temperature),
                          graphdef=graphdef, num_steps=sched.num_steps, use_cfg=use_cfg,
                          modulation_budget=int(modulation_budget))
