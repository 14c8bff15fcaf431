"""Heun flow solver (issue 17): order of convergence on a linear ODE, the per-evaluation plan
against a direct NumPy loop (CFG flags at both stages), whole FlowAR sampling with Heun against
a PyTorch Heun loop driving the reference model with the same injected noise, evaluation counts
in the engine plan / FLOP model, the default (Euler) path unchanged, and bad solver names."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flowar_testlib import jax_model, max_rel_error, torch_model

import reference.flowar as ref
from disa_jax.diffusion.flow import (
  EulerPlan,
  HeunPlan,
  cfg_combine,
  euler_solve,
  flowar_heun_plan,
  flowar_plan,
  flowar_time_grid,
  heun_plan_from_grid,
  heun_solve,
  num_evaluations,
  step_bucket,
  time_to_tau,
  torch_linspace,
)
from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import TINY
from disa_jax.systems.flowar.engine import FlowAREngineSampler
from disa_jax.systems.flowar.flops import head_eval_flops, run_flops, scale_flops
from disa_jax.systems.flowar.sampling import FlowARSampler

RATE = 1.7          # dx/dt = RATE x, integrated from t = 1 to t = 0: x(0) = x(1) exp(-RATE)


def _linear_velocity(x, t, tau, guided):
  del t, tau, guided
  return RATE * x


def _uniform_grid(n):
  return torch_linspace(1.0, 0.0, n + 1)


def _euler_plan_from_grid(grid):
  return EulerPlan(t=grid[:-1].astype(np.float32), dt=np.diff(grid).astype(np.float32),
                   tau=time_to_tau(grid[:-1]), guided=np.zeros(len(grid) - 1, bool))


def test_heun_is_second_order_euler_first_order_on_linear_ode():
  x1 = jnp.asarray([1.0, -0.5], jnp.float32)
  exact = np.asarray(x1, np.float64) * np.exp(-RATE)
  heun_err, euler_err = [], []
  for n in (8, 16, 32, 64):
    grid = _uniform_grid(n)
    h = heun_solve(_linear_velocity, x1, heun_plan_from_grid(grid).arrays())
    e = euler_solve(_linear_velocity, x1, _euler_plan_from_grid(grid).arrays())
    heun_err.append(np.abs(np.asarray(h, np.float64) - exact).max())
    euler_err.append(np.abs(np.asarray(e, np.float64) - exact).max())
  heun_ratio = np.array(heun_err[:-1]) / np.array(heun_err[1:])
  euler_ratio = np.array(euler_err[:-1]) / np.array(euler_err[1:])
  # halving the step: error / 4 (second order, the final Euler step included; the ratio
  # approaches 4 from above: 4.66, 4.30, 4.15 measured), Euler / 2 (2.05, 2.03, 2.01)
  assert np.all((heun_ratio > 3.6) & (heun_ratio < 4.8)), heun_ratio
  assert 3.7 < heun_ratio[-1] < 4.3, heun_ratio
  assert np.all((euler_ratio > 1.8) & (euler_ratio < 2.2)), euler_ratio
  assert heun_err[-1] < euler_err[-1] / 20


def test_heun_evaluation_layout_and_counts():
  plan = flowar_heun_plan(6, cfg=3.0, guidance_high=0.9)
  grid = flowar_time_grid(6)                  # 1, 0.65, 0.3 | 0.25, 0.1667, 0.0833, 0
  n = len(grid) - 1
  assert isinstance(plan, HeunPlan) and plan.num_evals == 2 * n - 1 == num_evaluations(6, 'heun')
  np.testing.assert_array_equal(plan.t[0::2], grid[:-1].astype(np.float32))   # predictors
  np.testing.assert_array_equal(plan.t[1::2], grid[1:-1].astype(np.float32))  # correctors
  # guided by the Euler rule at each evaluation's own time: t = 1 not, its corrector at 0.65 yes
  assert plan.guided.tolist() == [False] + [True] * (2 * n - 2)
  assert plan.a[-1] == np.float32(grid[-1] - grid[-2]) and plan.c[-1] == 0   # last: Euler
  assert [num_evaluations(k, 'heun') for k in (2, 15, 25, 50)] == [3, 27, 47, 99]
  assert [num_evaluations(k) for k in (2, 15, 25, 50)] == [2, 14, 24, 50]
  assert isinstance(flowar_plan(6), EulerPlan)
  with pytest.raises(ValueError, match='heun'):
    flowar_plan(6, solver='rk4')


def test_heun_solve_matches_numpy_trapezoid_with_guidance():
  """The coefficient form of `heun_solve` equals the textbook loop, CFG flags per stage."""
  cfg, high, steps = 3.0, 0.7, 9
  grid = flowar_time_grid(steps)
  x0 = np.linspace(-2, 2, 8).astype(np.float32)

  def v_np(x, t, tau, g):
    v_c, v_u = -x * t + 0.3, x * 0.5
    return (v_u + cfg * (v_c - v_u) if g else v_c) + tau * 1e-4

  def velocity(x, t, tau, guided):
    v_c, v_u = -x * t + 0.3, x * 0.5
    return jnp.where(guided, cfg_combine(v_c, v_u, cfg), v_c) + tau * 1e-4

  got = heun_solve(velocity, jnp.asarray(x0), flowar_heun_plan(steps, cfg, high).arrays())
  x = x0.astype(np.float64)
  n = len(grid) - 1
  for i in range(n):
    t0, t1 = grid[i], grid[i + 1]
    v0 = v_np(x, np.float32(t0), time_to_tau(t0), cfg > 1 and t0 <= high)
    if i == n - 1:
      x = x + (t1 - t0) * v0
    else:
      xp = x + (t1 - t0) * v0
      x = x + (t1 - t0) * 0.5 * (v0 + v_np(xp, np.float32(t1), time_to_tau(t1),
                                           cfg > 1 and t1 <= high))
  np.testing.assert_allclose(np.asarray(got), x, rtol=2e-6, atol=2e-6)


def torch_heun_sampler(head, latents, z, num_steps, cfg_scale=1.0, guidance_high=1.0,
                       guidance_low=0.0, state_dtype=torch.float64):
  """Heun over the official FlowAR grid in PyTorch (float64 state as the official Euler loop),
  guided evaluations duplicating the class half exactly as `reference.flowar.euler_sampler`."""
  grid = ref.time_grid(num_steps)
  x = latents.to(state_dtype)

  def velocity(x, t):
    guided = cfg_scale > 1.0 and guidance_low <= t <= guidance_high
    inp = torch.cat([x[: x.shape[0] // 2]] * 2) if guided else x
    t_in = torch.ones(inp.shape[0], dtype=torch.float64) * t
    d = head(inp.float(), t_in.float(), z.float()).to(state_dtype)
    if guided:
      dc, du = d.chunk(2)
      d = du + cfg_scale * (dc - du)
      d = torch.cat([d, d])
    return d

  n = len(grid) - 1
  for i in range(n):
    t_cur, t_next = grid[i], grid[i + 1]
    dt = (t_next - t_cur).to(state_dtype)
    v0 = velocity(x, t_cur)
    if i == n - 1:
      x = x + dt * v0
    else:
      x = x + dt * 0.5 * (v0 + velocity(x + dt * v0, t_next))
  return x


_MODELS = {}


def _models(tmp_path_factory):
  if 'S' not in _MODELS:
    tm = torch_model('S')
    _MODELS['S'] = (tm, jax_model(tm, tmp_path_factory.mktemp('pth')))
  return _MODELS['S']


@pytest.mark.parametrize('cfg', [1.0, 3.0])
def test_flowar_heun_matches_torch_heun(tmp_path_factory, monkeypatch, cfg):
  import jax

  tm, jm = _models(tmp_path_factory)
  labels = np.array([3, 7])
  steps = [6, 5, 4, 3, 2]
  rows = 2 * len(labels) if cfg != 1.0 else len(labels)
  g = torch.Generator().manual_seed(5)
  noise = [torch.randn(rows, s * s, 16, generator=g) for s in tm.scales]
  monkeypatch.setattr(ref, 'euler_sampler', torch_heun_sampler)   # sample_tokens' inner loop
  want = tm.sample_tokens(torch.as_tensor(labels), cfg=cfg, guidance=0.9, noise=noise,
                          steps=steps).numpy()
  monkeypatch.undo()
  euler_want = tm.sample_tokens(torch.as_tensor(labels), cfg=cfg, guidance=0.9, noise=noise,
                                steps=steps).numpy()
  sampler = FlowARSampler(jm)
  with jax.default_matmul_precision('highest'):
    got = sampler.generate(labels, steps=steps, cfg=cfg, guidance=0.9,
                           noise=[n.numpy() for n in noise], solver='heun')
  err = max_rel_error(got, want)
  assert err < 2e-5, err
  assert np.abs(want).max() > 1.0
  assert max_rel_error(euler_want, want) > 1e-2        # Heun is not Euler on this model
  # one trace per scale, keyed by the bucket of its 2 N - 1 evaluations and the solver
  assert sorted((k[:2], k[4]) for k in sampler.traces) == [
    ((s, step_bucket(num_evaluations(n, 'heun'))), 'heun') for s, n in enumerate(steps)]


def test_default_solver_is_euler_bit_for_bit(tmp_path_factory):
  _, jm = _models(tmp_path_factory)
  labels = np.array([1, 2])
  rng = np.random.default_rng(0)
  noise = [rng.normal(size=(4, s * s, 16)).astype(np.float32) for s in TINY['S'].scales]
  sampler = FlowARSampler(jm)
  kw = dict(steps=[4, 4, 3, 3, 2], cfg=2.0, guidance=0.9, noise=noise)
  default = np.asarray(sampler.generate(labels, **kw))
  euler = np.asarray(sampler.generate(labels, solver='euler', **kw))
  heun = np.asarray(sampler.generate(labels, solver='heun', **kw))
  np.testing.assert_array_equal(default, euler)
  assert np.abs(default - heun).max() > 1e-3
  with pytest.raises(UserError, match='unknown flow solver'):
    sampler.generate(labels, solver='rk45', **kw)

  engine = FlowAREngineSampler(jm, cfg=2.0, guidance=0.9, solver='heun')
  got = engine.generate(labels, None, steps=kw['steps'], noise=noise)
  np.testing.assert_allclose(np.asarray(got), heun.reshape(2, 16, 256).transpose(0, 2, 1),
                             rtol=0, atol=1e-5 * np.abs(heun).max())
  assert engine.last_stats.plan.report()['solver'] == 'heun'


def test_engine_plan_and_flops_count_heun_evaluations(tmp_path_factory):
  _, jm = _models(tmp_path_factory)
  steps = [6, 5, 4, 3, 2]
  engine = FlowAREngineSampler(jm, cfg=2.0)
  euler = engine.plan(2, steps=steps)
  heun = engine.plan(2, steps=steps, solver='heun')
  assert euler.evals == (6, 4, 4, 2, 2) and euler.solver == 'euler'
  assert heun.evals == (11, 7, 7, 3, 3) and heun.solver == 'heun'
  sq = [m * m for m in TINY['S'].scales]
  assert heun.head_token_steps() == sum(n * e for n, e in zip(sq, heun.evals, strict=True))
  with pytest.raises(UserError, match='sampling.solver'):
    FlowAREngineSampler(jm, solver='midpoint')
  cfg = TINY['S']
  fe = run_flops(cfg, steps, cfg_scale=2.0)
  fh = run_flops(cfg, steps, cfg_scale=2.0, solver='heun')
  assert fe['trunk'] == fh['trunk']
  want = sum(2 * e * head_eval_flops(cfg, s) for s, e in enumerate(heun.evals))
  assert fh['head'] == pytest.approx(want) and fh['head'] > 1.5 * fe['head']
  assert [p['evals'] for p in scale_flops(cfg, steps, solver='heun')] == list(heun.evals)


def test_config_field_and_validation():
  from disa_jax.systems.flowar.config import flowar_config
  from disa_jax.systems.flowar.system import flops, stage_plan, validate

  c = flowar_config('S', 'tiny')
  assert c.sampling.solver == 'euler'
  validate(c)
  c.sampling.solver = 'heun'
  validate(c)
  plan = stage_plan(c.sampling)
  assert flops(c.model, plan, solver='heun')['head'] > flops(c.model, plan)['head']
  c.sampling.solver = 'Heun'
  with pytest.raises(UserError, match='sampling.solver'):
    validate(c)
