"""Flow solvers of disa_jax.diffusion.flow: Euler loop, CFG hook, Euler-Maruyama pieces, Heun."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disa_jax.diffusion.flow import (
  cfg_combine,
  euler_maruyama_step,
  euler_solve,
  flowar_euler_plan,
  flowar_heun_plan,
  heun_solve,
  heun_step,
  linear_path_drift,
  step_bucket,
)


def test_euler_solve_matches_numpy_loop_and_guidance_flags():
  plan = flowar_euler_plan(17, cfg=3.0, guidance_high=0.9)
  x0 = np.linspace(-2, 2, 8).astype(np.float32)

  def velocity(x, t, tau, guided):
    v_c, v_u = -x * t, x * 0.5
    return jnp.where(guided, cfg_combine(v_c, v_u, 3.0), v_c) + tau * 1e-4

  got = euler_solve(velocity, jnp.asarray(x0), plan.arrays())
  x = x0.astype(np.float64)
  for t, dt, tau, g in zip(plan.t, plan.dt, plan.tau, plan.guided, strict=True):
    v_c, v_u = -x * t, x * 0.5
    v = (v_u + 3.0 * (v_c - v_u) if g else v_c) + tau * 1e-4
    x = x + dt * v
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-6)
  assert plan.guided.tolist() == [False] + [True] * 15
  # padded to its bucket with a traced count (how the samplers call it): the same steps
  n = plan.num_evals
  padded = jax.jit(lambda x, arrays, n: euler_solve(velocity, x, arrays, n))(
    jnp.asarray(x0), plan.arrays(step_bucket(n)), jnp.int32(n))
  np.testing.assert_array_equal(np.asarray(padded), np.asarray(got))
  assert step_bucket(n) == 64 and plan.arrays(64)[0].shape == (64,)
  with pytest.raises(ValueError, match='cannot pad'):
    plan.arrays(n - 1)


def test_heun_solve_padded_plan_runs_only_its_evaluations():
  plan = flowar_heun_plan(9, cfg=2.0, guidance_high=0.8)
  x0 = np.linspace(-1, 1, 6).astype(np.float32)

  def velocity(x, t, tau, guided):
    return jnp.where(guided, -2.0 * x, -x) * t + tau * 1e-4

  want = heun_solve(velocity, jnp.asarray(x0), plan.arrays())
  got = heun_solve(velocity, jnp.asarray(x0), plan.arrays(128), jnp.int32(plan.num_evals))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_linear_path_drift_is_v_minus_t_score():
  v, x, t = 1.3, -0.7, 0.4
  score = ((t - 1) * v - x) / t
  assert np.isclose(linear_path_drift(v, x, t), v - t * score)


def test_euler_maruyama_step_noise_scale_and_last_step():
  x, d, noise = jnp.ones(3), jnp.full(3, 2.0), jnp.full(3, 1.0)
  out = euler_maruyama_step(x, d, 0.5, -0.25, noise, last=False)
  np.testing.assert_allclose(out, 1 - 0.5 + np.sqrt(1.0) * np.sqrt(0.25), rtol=1e-6)
  np.testing.assert_allclose(euler_maruyama_step(x, d, 0.5, -0.25, noise, last=True), 0.5)


def test_heun_second_order():
  # dx/dt = x from t=0 to 0.1: Heun's error is O(dt^3) per step, Euler's O(dt^2)
  x = heun_step(lambda x, t: x, jnp.asarray(1.0), 0.0, 0.1)
  assert abs(float(x) - np.exp(0.1)) < 2e-4 < abs(1.1 - np.exp(0.1))
