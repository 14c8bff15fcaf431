"""Flow-matching ODE / SDE solvers of FlowAR and xAR, with classifier-free-guidance hooks.

Official: `FlowAR_DiSA/models/sampler.py` (`euler_sampler`) and `xAR_DiSA/models/sampler.py`
(`euler_maruyama_sampler`). Path: x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0; t = 1 is
noise, t = 0 data; samplers integrate from 1 to 0.

FlowAR Euler time grid for a requested step count n (float64):
  n == 50: 51 uniform points 1 -> 0
  else:    n//2 points linspace(1, 0.3) followed by n//2 + 1 points linspace(0.25, 0)
so odd n loses one evaluation (25 -> 24, 17 -> 16, 15 -> 14) and the step 0.30 -> 0.25 is an
ordinary Euler step between segments of different spacing ("the jump").
Each step t_cur -> t_next: x <- x + (t_next - t_cur) v(x, t_cur). The network sees the time as
tau = trunc(fp32(fp32(t_cur) * 1000)) (`time_to_tau`), built host-side (never from a device
linspace). Guidance (FlowAR): a step is guided iff cfg_s > 1 and low <= t_cur <= high; guided
velocity v = v_u + cfg_s (v_c - v_u) (`cfg_combine`).

Grids are built with torch's linspace formula (first half start + i*step, second half
end - (n-1-i)*step); torch's vectorised CPU kernel can differ from it by one ulp at a few points,
which only matters where a point equals the guidance threshold to the ulp (spec §4.3; the README
configurations are unaffected and the golden tables are tested).

Euler-Maruyama (xAR): grid linspace(1, 0.04, n) then 0; drift d = v - t * score with
score = ((t - 1) v - x) / t, i.e. d = (2 - t) v + x; stochastic steps add
sqrt(2 t_cur) sqrt(|dt|) xi, the last step (0.04 -> 0) is deterministic.
Heun (FlowAR, `solver='heun'`; not in the official code, issue 17): the same grid; each step
t_cur -> t_next is the explicit trapezoid rule
  v0 = v(x, t_cur); x1 = x + dt v0; x <- x + dt (v0 + v(x1, t_next)) / 2
except the last step (t_next = 0), which is an Euler step (the usual choice, as in EDM's Heun
sampler: the velocity at t = 0 is not evaluated). Evaluations: 2 N - 1 for an N-step grid (always
odd; Euler's counts are even or 50, so the two never share a compiled shape by accident). Each
evaluation is guided by the same rule as Euler, at its own time: the predictor at t_cur, the
corrector at t_next (low <= t <= high), with the same CFG combine. `heun_solve` runs the 2N - 1
evaluations as one `lax.fori_loop` (the velocity is traced once) over per-evaluation coefficients
(`HeunPlan`). `heun_step` is the same rule for one step of a plain velocity field.

State precision: the official state is float64. JAX runs with x64 off, so the solvers keep the
state in float32; the step sizes dt are computed in float64 host-side and rounded once. The
measured difference (<= 3.5e-6 relative on FlowAR test models) is documented in
`disa_jax/systems/flowar/sampling.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float64 linspace with torch's formula (two halves anchored at start and end)."""
  if steps == 1:
    return np.array([start], np.float64)
  step = (end - start) / (steps - 1)
  i = np.arange(steps)
  half = steps // 2
  return np.where(i < half, start + step * i, end - step * (steps - 1 - i)).astype(np.float64)


def flowar_time_grid(num_steps: int) -> np.ndarray:
  """The official FlowAR Euler grid (float64) for `num_steps` requested steps."""
  if num_steps < 2:
    raise ValueError(f'FlowAR needs at least 2 flow steps per scale, got {num_steps}')
  if num_steps == 50:
    return torch_linspace(1.0, 0.0, 51)
  return np.concatenate([torch_linspace(1.0, 0.3, num_steps // 2),
                         torch_linspace(0.25, 0.0, num_steps // 2 + 1)])


FLOW_SOLVERS = ('euler', 'heun')


def check_flow_solver(solver: str) -> str:
  """`solver` if it is one of FLOW_SOLVERS, else ValueError naming the choices."""
  if solver not in FLOW_SOLVERS:
    raise ValueError(f'unknown flow solver {solver!r}; choose one of {", ".join(FLOW_SOLVERS)}')
  return solver


def num_evaluations(num_steps: int, solver: str = 'euler') -> int:
  """Network evaluations of the FlowAR grid: Euler 50 for 50, else 2 * (n // 2) (= N steps);
  Heun 2 N - 1 (two per step, one for the final Euler step)."""
  steps = len(flowar_time_grid(num_steps)) - 1
  return steps if check_flow_solver(solver) == 'euler' else 2 * steps - 1


def time_to_tau(t) -> np.ndarray:
  """Integer timesteps as the networks compute them: trunc(fp32(fp32(t) * 1000))."""
  t32 = np.asarray(t, np.float64).astype(np.float32)
  return np.trunc((t32 * np.float32(1000)).astype(np.float32)).astype(np.int32)


STEP_BUCKET = 64


def step_bucket(num_evals: int) -> int:
  """Padded length of a solver plan: the next multiple of STEP_BUCKET. The samplers pass the
  plan zero-padded to it plus the evaluation count as a traced scalar, so one executable serves
  every step count in the bucket (the padded entries are never evaluated)."""
  return -(-int(num_evals) // STEP_BUCKET) * STEP_BUCKET


def padded_arrays(arrays, length: int | None = None) -> tuple:
  """Host arrays (n,) as device arrays zero-padded to `length` (default n)."""
  n = len(arrays[0])
  pad = (n if length is None else int(length)) - n
  if pad < 0:
    raise ValueError(f'cannot pad a {n}-evaluation plan to {length}')
  return tuple(jnp.asarray(np.pad(a, (0, pad))) for a in arrays)


@dataclasses.dataclass(frozen=True)
class EulerPlan:
  """Host-side arrays of one Euler solve (length = evaluations).

  t: float32 t_cur fed to the network; dt: t_next - t_cur (float64 difference, float32);
  tau: integer timesteps; guided: whether CFG applies at the step.
  """

  t: np.ndarray
  dt: np.ndarray
  tau: np.ndarray
  guided: np.ndarray

  @property
  def num_evals(self) -> int:
    return len(self.t)

  def arrays(self, length: int | None = None):
    """(t, dt, tau, guided) as device arrays, zero-padded to `length` (>= num_evals)."""
    return padded_arrays((self.t, self.dt, self.tau, self.guided), length)


def guided_flags(grid: np.ndarray, cfg: float, high: float, low: float = 0.0) -> np.ndarray:
  """Per step (t_cur = grid[:-1]): cfg > 1 and low <= t_cur <= high (float64 comparisons)."""
  t_cur = grid[:-1]
  return (cfg > 1.0) & (t_cur <= high) & (t_cur >= low)


def flowar_euler_plan(num_steps: int, cfg: float = 1.0, guidance_high: float = 1.0,
                      guidance_low: float = 0.0) -> EulerPlan:
  """The FlowAR Euler plan for a requested step count and (per-scale) CFG / interval."""
  grid = flowar_time_grid(num_steps)
  return EulerPlan(t=grid[:-1].astype(np.float32), dt=np.diff(grid).astype(np.float32),
                   tau=time_to_tau(grid[:-1]),
                   guided=guided_flags(grid, cfg, guidance_high, guidance_low))


@dataclasses.dataclass(frozen=True)
class HeunPlan:
  """Host-side arrays of one Heun solve, one entry per network evaluation (2 N - 1).

  t, tau, guided: the evaluation's time (float32), integer timestep and CFG flag;
  a, b, c: float32 coefficients of the update after evaluation k with velocity v (v_prev = the
  previous evaluation's velocity, `x_base` the state at the current grid point, `x_eval` where
  the next evaluation looks):
    x_base <- x_base + a v + b v_prev;  x_eval <- x_base + c v
  predictor (a, b, c) = (0, 0, dt); corrector (dt/2, dt/2, 0); final Euler step (dt, 0, 0).
  """

  t: np.ndarray
  tau: np.ndarray
  guided: np.ndarray
  a: np.ndarray
  b: np.ndarray
  c: np.ndarray

  @property
  def num_evals(self) -> int:
    return len(self.t)

  def arrays(self, length: int | None = None):
    """(t, tau, guided, a, b, c) as device arrays, zero-padded to `length` (>= num_evals)."""
    return padded_arrays((self.t, self.tau, self.guided, self.a, self.b, self.c), length)


def heun_plan_from_grid(grid: np.ndarray, cfg: float = 1.0, guidance_high: float = 1.0,
                        guidance_low: float = 0.0) -> HeunPlan:
  """Heun over a float64 grid 1 -> ... -> t_N (last step Euler; see the module docstring)."""
  grid = np.asarray(grid, np.float64)
  n = len(grid) - 1
  times, a, b, c = [], [], [], []
  for i in range(n):
    dt = grid[i + 1] - grid[i]
    if i < n - 1:
      times += [grid[i], grid[i + 1]]
      a += [0.0, dt / 2]
      b += [0.0, dt / 2]
      c += [dt, 0.0]
    else:
      times.append(grid[i])
      a.append(dt)
      b.append(0.0)
      c.append(0.0)
  times = np.asarray(times, np.float64)
  guided = (cfg > 1.0) & (times <= guidance_high) & (times >= guidance_low)
  f32 = lambda v: np.asarray(v, np.float64).astype(np.float32)  # noqa: E731
  return HeunPlan(t=f32(times), tau=time_to_tau(times), guided=guided, a=f32(a), b=f32(b),
                  c=f32(c))


def flowar_heun_plan(num_steps: int, cfg: float = 1.0, guidance_high: float = 1.0,
                     guidance_low: float = 0.0) -> HeunPlan:
  """Heun over the FlowAR grid of `num_steps` requested steps (2 N - 1 evaluations)."""
  return heun_plan_from_grid(flowar_time_grid(num_steps), cfg, guidance_high, guidance_low)


def flowar_plan(num_steps: int, cfg: float = 1.0, guidance_high: float = 1.0,
                guidance_low: float = 0.0, *, solver: str = 'euler'):
  """`flowar_euler_plan` or `flowar_heun_plan` by `solver`."""
  build = flowar_euler_plan if check_flow_solver(solver) == 'euler' else flowar_heun_plan
  return build(num_steps, cfg, guidance_high, guidance_low)


def cfg_combine(v_cond, v_uncond, scale):
  """v_u + scale (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def euler_solve(velocity, x, plan_arrays, num_evals=None):
  """x after the Euler steps of `plan_arrays` = (t, dt, tau, guided) (device arrays).

  velocity(x, t, tau, guided) -> v with x's shape (t, tau, guided: scalars of the step);
  runs as one `lax.fori_loop`, so it traces `velocity` once. `num_evals` (may be traced): the
  steps to run of a padded plan (default: all).
  """
  t, dt, tau, guided = plan_arrays

  def body(i, x):
    v = velocity(x, t[i], tau[i], guided[i])
    return x + dt[i].astype(x.dtype) * v.astype(x.dtype)

  return jax.lax.fori_loop(0, t.shape[0] if num_evals is None else num_evals, body, x)


def heun_solve(velocity, x, plan_arrays, num_evals=None):
  """x after the Heun evaluations of `plan_arrays` = (t, tau, guided, a, b, c) (`HeunPlan`).

  velocity(x, t, tau, guided) -> v as for `euler_solve`; one `lax.fori_loop` over evaluations
  with carry (x_base, x_eval, v_prev), so `velocity` is traced once; `num_evals` as there.
  """
  t, tau, guided, a, b, c = plan_arrays

  def body(i, carry):
    x_base, x_eval, v_prev = carry
    v = velocity(x_eval, t[i], tau[i], guided[i]).astype(x.dtype)
    x_base = x_base + a[i].astype(x.dtype) * v + b[i].astype(x.dtype) * v_prev
    return x_base, x_base + c[i].astype(x.dtype) * v, v

  x_base, _, _ = jax.lax.fori_loop(0, t.shape[0] if num_evals is None else num_evals, body,
                                   (x, x, jnp.zeros_like(x)))
  return x_base


def flow_solve(velocity, x, plan_arrays, num_evals=None):
  """`euler_solve` for an EulerPlan's arrays (4), `heun_solve` for a HeunPlan's (6)."""
  solve = euler_solve if len(plan_arrays) == 4 else heun_solve
  return solve(velocity, x, plan_arrays, num_evals)


def euler_maruyama_grid(num_steps: int) -> np.ndarray:
  """xAR grid: linspace(1, 0.04, n) then 0 (float64, n + 1 points, n evaluations)."""
  if num_steps < 3:
    raise ValueError(f'the Euler-Maruyama sampler needs at least 3 steps, got {num_steps}')
  return np.concatenate([torch_linspace(1.0, 0.04, num_steps), [0.0]])


def linear_path_drift(v, x, t):
  """SDE drift of the linear path: v - t * score with score = ((t - 1) v - x) / t."""
  return (2.0 - t) * v + x


def euler_maruyama_step(x, drift, t_cur, dt, noise, *, last: bool):
  """x + drift dt (+ sqrt(2 t_cur) sqrt(|dt|) noise unless `last`)."""
  x = x + drift * dt
  if last:
    return x
  return x + jnp.sqrt(2.0 * t_cur) * jnp.sqrt(jnp.abs(dt)) * noise


def heun_step(velocity, x, t_cur, t_next):
  """One Heun step: Euler predictor, trapezoidal corrector (velocity(x, t) -> v)."""
  dt = t_next - t_cur
  v0 = velocity(x, t_cur)
  x1 = x + dt * v0
  return x + dt * 0.5 * (v0 + velocity(x1, t_next))
