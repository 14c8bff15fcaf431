"""Head solvers (DDIM, DPM-Solver++(2M), its SDE variant, second-order DDPM) against numpy;
traced step counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel_error, tiny_model

import disa_jax
from disa_jax.diffusion.ddpm import solver_tables
from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.schedules import resolve_steps
from disa_jax.systems.mar.sampling import Sampler

C = 16


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=5)


def _eps_v(net, x, t, z, cfg):
  """(guided eps, conditional variance channels) from the official algebra
  (`forward_with_cfg`: CFG on the eps channels)."""
  if cfg == 1.0:
    out = np.asarray(net(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), t), z))
  else:
    xx = jnp.asarray(np.concatenate([x, x]), jnp.float32)
    out = np.asarray(net.forward_with_cfg(xx, jnp.full((xx.shape[0],), t), z, cfg))
  return out[: x.shape[0], :C], out[: x.shape[0], C:]


def _eps(net, x, t, z, cfg):
  return _eps_v(net, x, t, z, cfg)[0]


def _draws(key, n, count):
  keys = jax.random.split(key, n)
  return [np.asarray(jax.vmap(lambda k, s=s: jax.random.normal(jax.random.fold_in(k, s), (C,)))(
    keys), np.float64) for s in range(count)]


def _numpy_ddim(net, z, key, steps, max_t, cfg, eta, temperature):
  sched = spaced_schedule(steps, max_t)
  ac = sched.tables.alphas_cumprod
  n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
  draws = _draws(key, n, sched.num_steps + 1)
  x = draws[0]
  for i, k in enumerate(reversed(range(sched.num_steps))):
    a, a_prev = ac[k], (ac[k - 1] if k > 0 else 1.0)
    eps = _eps(net, x, sched.timesteps[k], z, cfg)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
         + (k > 0) * sigma * temperature * draws[i + 1])
  return x


def _numpy_dpmpp_2m(net, z, key, steps, max_t, cfg):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in data prediction, last step to x0."""
  sched = spaced_schedule(steps, max_t)
  ac = sched.tables.alphas_cumprod
  n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
  x = _draws(key, n, 1)[0]
  ks = list(reversed(range(sched.num_steps)))
  lam = lambda k: 0.5 * np.log(ac[k] / (1 - ac[k]))  # noqa: E731
  x0_prev = None
  for k in ks:
    eps = _eps(net, x, sched.timesteps[k], z, cfg)
    x0 = (x - np.sqrt(1 - ac[k]) * eps) / np.sqrt(ac[k])
    if k == 0:
      return x0
    h = lam(k - 1) - lam(k)
    alpha_t, sigma_t, sigma_s = np.sqrt(ac[k - 1]), np.sqrt(1 - ac[k - 1]), np.sqrt(1 - ac[k])
    if x0_prev is None:
      x = sigma_t / sigma_s * x - alpha_t * (np.exp(-h) - 1) * x0
    else:
      r = (lam(k) - lam(k + 1)) / h
      d1 = (x0 - x0_prev) / r
      x = (sigma_t / sigma_s * x - alpha_t * (np.exp(-h) - 1) * x0
           - 0.5 * alpha_t * (np.exp(-h) - 1) * d1)
    x0_prev = x0
  raise AssertionError('unreachable')


def _numpy_dpmpp_2m_sde(net, z, key, steps, max_t, cfg, temperature):
  """DPM-Solver++(2M) SDE (Lu et al. 2022, 'SDE-DPM-Solver++(2M)', midpoint form as diffusers'
  `sde-dpmsolver++`), last step to x0; noise draw i + 1 at iteration i (as the JAX loop)."""
  sched = spaced_schedule(steps, max_t)
  ac = sched.tables.alphas_cumprod
  n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
  draws = _draws(key, n, sched.num_steps + 1)
  x = draws[0]
  lam = lambda k: 0.5 * np.log(ac[k] / (1 - ac[k]))  # noqa: E731
  x0_prev = None
  for i, k in enumerate(reversed(range(sched.num_steps))):
    eps = _eps(net, x, sched.timesteps[k], z, cfg)
    x0 = (x - np.sqrt(1 - ac[k]) * eps) / np.sqrt(ac[k])
    if k == 0:
      return x0
    h = lam(k - 1) - lam(k)
    alpha_t, sigma_t, sigma_s = np.sqrt(ac[k - 1]), np.sqrt(1 - ac[k - 1]), np.sqrt(1 - ac[k])
    d = x0 if x0_prev is None else x0 + 0.5 * (x0 - x0_prev) / ((lam(k) - lam(k + 1)) / h)
    x = (sigma_t / sigma_s * np.exp(-h) * x + alpha_t * (1 - np.exp(-2 * h)) * d
         + sigma_t * np.sqrt(1 - np.exp(-2 * h)) * temperature * draws[i + 1])
    x0_prev = x0
  raise AssertionError('unreachable')


def _numpy_ddpm_2m(net, z, key, steps, max_t, cfg, temperature):
  """The official DDPM step (learned-range variance) with x0 replaced by the DPM-Solver++(2M)
  data prediction D = x0 + (x0 - x0_prev) / (2 r) (first and last steps: D = x0)."""
  sched = spaced_schedule(steps, max_t)
  tb = sched.tables
  ac = tb.alphas_cumprod
  n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
  draws = _draws(key, n, sched.num_steps + 1)
  x = draws[0]
  lam = lambda k: 0.5 * np.log(ac[k] / (1 - ac[k]))  # noqa: E731
  x0_prev = None
  for i, k in enumerate(reversed(range(sched.num_steps))):
    eps, v = _eps_v(net, x, sched.timesteps[k], z, cfg)
    x0 = (x - np.sqrt(1 - ac[k]) * eps) / np.sqrt(ac[k])
    d = x0
    if x0_prev is not None and k > 0:
      d = x0 + (x0 - x0_prev) / (2 * (lam(k) - lam(k + 1)) / (lam(k - 1) - lam(k)))
    frac = (v + 1) / 2
    log_var = frac * np.log(tb.betas[k]) + (1 - frac) * tb.posterior_log_variance_clipped[k]
    mean = tb.posterior_mean_coef1[k] * d + tb.posterior_mean_coef2[k] * x
    x = mean + (k > 0) * np.exp(0.5 * log_var) * temperature * draws[i + 1]
    x0_prev = x0
  return x


def _z(n, cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((2 * n if cfg != 1.0 else n, 64)), jnp.float32)


@pytest.mark.parametrize('eta,cfg,max_t', [(0.0, 1.0, None), (0.0, 3.0, 950), (0.7, 2.5, 950)])
def test_ddim_matches_numpy(model, eta, cfg, max_t):
  z, key = _z(4, cfg), jax.random.key(3)
  got = disa_jax.sample_head(model, z, key, num_steps=7, cfg=cfg, max_timestep=max_t,
                             solver='ddim', eta=eta, temperature=0.9)
  want = _numpy_ddim(model.diffloss.net, z, key, 7, max_t, cfg, eta, 0.9)
  assert max_rel_error(got, want) < 2e-5


@pytest.mark.parametrize('steps,cfg,max_t', [(7, 1.0, None), (9, 3.0, 950), (2, 2.0, None),
                                             (1, 2.0, 950)])
def test_dpmpp_2m_matches_numpy(model, steps, cfg, max_t):
  z, key = _z(4, cfg, seed=1), jax.random.key(4)
  got = disa_jax.sample_head(model, z, key, num_steps=steps, cfg=cfg, max_timestep=max_t,
                             solver='dpmpp_2m')
  want = _numpy_dpmpp_2m(model.diffloss.net, z, key, steps, max_t, cfg)
  assert max_rel_error(got, want) < 2e-5


@pytest.mark.parametrize('solver', ['dpmpp_2m_sde', 'ddpm_2m'])
@pytest.mark.parametrize('steps,cfg,max_t,temp', [(7, 1.0, None, 1.0), (9, 3.0, 950, 0.9),
                                                  (2, 2.0, None, 1.0), (1, 2.0, 950, 1.0)])
def test_stochastic_second_order_matches_numpy(model, solver, steps, cfg, max_t, temp):
  reference = {'dpmpp_2m_sde': _numpy_dpmpp_2m_sde, 'ddpm_2m': _numpy_ddpm_2m}[solver]
  z, key = _z(4, cfg, seed=6), jax.random.key(7)
  got = disa_jax.sample_head(model, z, key, num_steps=steps, cfg=cfg, max_timestep=max_t,
                             solver=solver, temperature=temp)
  want = reference(model.diffloss.net, z, key, steps, max_t, cfg, temp)
  assert max_rel_error(got, want) < 2e-5


def test_ddpm_2m_first_order_is_ddpm(model):
  """ddpm_2m's only change to the official sampler is the second-order x0: with at most two
  steps (every step first order) it is ddpm bit for bit, with more it differs."""
  z, key = _z(3, 2.0, seed=10), jax.random.key(3)
  for steps, same in ((2, True), (6, False)):
    kw = dict(num_steps=steps, cfg=2.0, max_timestep=950)
    a = disa_jax.sample_head(model, z, key, solver='ddpm_2m', **kw)
    b = disa_jax.sample_head(model, z, key, solver='ddpm', **kw)
    assert (float(jnp.abs(a - b).max()) == 0.0) == same


def test_dpmpp_2m_sde_is_stochastic(model):
  """The SDE variant injects noise at every step but the last (temperature 0 removes it and
  changes the result) and differs from the ODE solver."""
  z, key = _z(3, 2.0, seed=8), jax.random.key(5)
  kw = dict(num_steps=8, cfg=2.0, max_timestep=950)
  sde = disa_jax.sample_head(model, z, key, solver='dpmpp_2m_sde', **kw)
  cold = disa_jax.sample_head(model, z, key, solver='dpmpp_2m_sde', temperature=0.0, **kw)
  ode = disa_jax.sample_head(model, z, key, solver='dpmpp_2m', **kw)
  assert float(jnp.abs(sde - cold).max()) > 1e-3
  assert float(jnp.abs(sde - ode).max()) > 1e-3


def test_dpmpp_2m_differs_from_first_order(model):
  """The second-order correction is in the tables (a first-order DPM-Solver++ = DDIM eta=0)."""
  tb = solver_tables(9, 950, 'dpmpp_2m')
  assert tb['dpm_x0_prev'][0] == 0 and np.all(tb['dpm_x0_prev'][1:-1] != 0)
  z, key = _z(3, 3.0, seed=2), jax.random.key(1)
  a = disa_jax.sample_head(model, z, key, num_steps=9, cfg=3.0, solver='dpmpp_2m')
  b = disa_jax.sample_head(model, z, key, num_steps=9, cfg=3.0, solver='ddim')
  assert float(jnp.abs(a - b).max()) > 1e-4


@pytest.mark.parametrize('solver', ['ddim', 'dpmpp_2m'])
def test_cfg_acts_on_eps(model, solver):
  """Guided eps = eps_u + s (eps_c - eps_u): s = 1 with distinct cond/uncond rows equals the
  unguided conditional run, and a larger scale changes the samples."""
  n, key = 3, jax.random.key(2)
  z = _z(n, 2.0, seed=3)
  zc = z[:n]
  plain = disa_jax.sample_head(model, zc, key, num_steps=6, solver=solver)
  guided = disa_jax.sample_head(model, z, key, num_steps=6, cfg=4.0, solver=solver)
  want = (_numpy_ddim(model.diffloss.net, z, key, 6, None, 4.0, 0.0, 1.0) if solver == 'ddim'
          else _numpy_dpmpp_2m(model.diffloss.net, z, key, 6, None, 4.0))
  assert max_rel_error(guided, want) < 2e-5
  assert float(jnp.abs(plain - guided).max()) > 1e-3


def test_default_solver_is_ddpm(model):
  z, key = _z(3, 2.0, seed=4), jax.random.key(9)
  a = disa_jax.sample_head(model, z, key, num_steps=5, cfg=2.0, max_timestep=950)
  b = disa_jax.sample_head(model, z, key, num_steps=5, cfg=2.0, max_timestep=950, solver='ddpm')
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_solver_rejected(model):
  with pytest.raises(ValueError, match='unknown head solver'):
    disa_jax.sample_head(model, _z(2, 1.0), jax.random.key(0), num_steps=3, solver='euler')
  with pytest.raises(ValueError, match='eta'):
    Sampler(model, solver='ddim', eta=-1.0)


DISA = resolve_steps(num_iter=6, preset='disa', upper=8, lower=3)
# The official solver and one multistep solver run in the default suite, the rest under `slow`
# (~30 s each on the 2-core CPU; the per-solver step algebra is tested above in every suite).
SLOW_SOLVERS = [pytest.param(s, marks=pytest.mark.slow) for s in ('ddim', 'dpmpp_2m_sde', 'ddpm_2m')]


@pytest.mark.parametrize('solver', ['ddpm', 'dpmpp_2m', *SLOW_SOLVERS])
def test_traced_step_count_matches_exact(model, solver):
  """One head executable per rows bucket (traced trip count) gives the exact buckets' numbers
  (DiSA's annealed step list), with fewer compiles."""
  labels, key = np.array([1, 2]), jax.random.key(6)
  kw = dict(steps=DISA.steps, max_timestep=950, cfg=2.0)
  exact = Sampler(model, enc_bucket=4, solver=solver, eta=0.5)
  traced = Sampler(model, enc_bucket=4, solver=solver, eta=0.5, head_steps='traced')
  a = exact.generate(labels, key, **kw)
  b = traced.generate(labels, key, **kw)
  assert max_rel_error(b, a) < 1e-5
  plan = traced.plan(2, steps=DISA.steps, max_timestep=950, cfg=2.0)
  assert traced.last_stats.compiles['head'] == len(plan.head_buckets) == len(
    {s.n_pad for s in plan.steps})
  assert traced.last_stats.compiles['head'] < exact.last_stats.compiles['head']


def test_generate_solver_override(model):
  labels, key = np.array([3]), jax.random.key(0)
  s = Sampler(model, enc_bucket=4)
  a = s.generate(labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0, solver='dpmpp_2m')
  b = Sampler(model, enc_bucket=4, solver='dpmpp_2m').generate(
    labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0)
  c = s.generate(labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  assert float(jnp.abs(a - c).max()) > 1e-4


def test_parallel_compile_same_numbers(model):
  labels, key = np.array([1, 2]), jax.random.key(6)
  kw = dict(steps=DISA.steps, max_timestep=950, cfg=2.0)
  a = Sampler(model, enc_bucket=4).generate(labels, key, **kw)
  s = Sampler(model, enc_bucket=4, compile_threads=2)
  b = s.generate(labels, key, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plan = s.plan(2, **kw)
  assert s.last_stats.compiles == {'init': 1, 'backbone': len(plan.backbone_buckets),
                                   'head': len(plan.head_buckets)}


@pytest.mark.parametrize('solver', ['ddpm', 'dpmpp_2m', *SLOW_SOLVERS])
def test_modulation_budget_every_solver(model, solver):
  """The per-step adaLN path (budget 0) gives the precomputed path's numbers for every solver,
  through `sample_head` and through the Sampler in both head_steps modes; the budget is part
  of the head executables' cache key (changing it recompiles, never reuses)."""
  from disa_jax.diffusion.ddpm import MODULATION_BUDGET_BYTES

  z, key = _z(3, 2.0, seed=2), jax.random.key(5)
  kw = dict(num_steps=5, cfg=2.0, max_timestep=950, solver=solver, eta=0.6, temperature=0.9)
  a = disa_jax.sample_head(model, z, key, **kw)
  b = disa_jax.sample_head(model, z, key, modulation_budget=0, **kw)
  assert max_rel_error(b, a) < 1e-5 and float(jnp.abs(a).max()) > 0.1
  labels, key = np.array([1, 2]), jax.random.key(6)
  gen = dict(steps=DISA.steps, max_timestep=950, cfg=2.0)
  ref = Sampler(model, enc_bucket=4, solver=solver, eta=0.6).generate(labels, key, **gen)
  for head_steps in ('exact', 'traced'):
    s = Sampler(model, enc_bucket=4, solver=solver, eta=0.6, head_steps=head_steps,
                modulation_budget=0)
    assert max_rel_error(s.generate(labels, key, **gen), ref) < 1e-5, head_steps
    heads = s.last_stats.compiles['head']
    s.modulation_budget = MODULATION_BUDGET_BYTES
    s.generate(labels, key, **gen)
    assert s.last_stats.compiles['head'] == heads > 0, head_steps
