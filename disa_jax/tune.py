"""Calibrated per-AR-step schedules from a quality budget (`disa-tune`).

DiSA's schedules (linear / cosine / two-stage, `schedules.py`) are hand-set. A tuned schedule is
measured instead: on a probe batch, for every AR stage s, how far the head's k-step samples land
from a many-step reference, and the fewest steps within a budget.

Why a distributional distance. The head's DDPM sampler is stochastic: two reference draws with
different noise land far apart even with 1000 steps, so the per-sample distance between a
k-step sample and a reference sample with shared initial noise mostly measures that noise, not
the discretisation error. What a k-step sampler gets wrong is the *distribution* it samples for a
given condition (too wide / too narrow, shifted). So, per condition (the decoder output z of one
predicted token, with its CFG branch and the stage's guidance scale), M tokens are drawn from
the head and summarised by their mean mu [C] and per-dimension standard deviation sd [C]; the
distance between two sample sets of the same conditions is the squared 2-Wasserstein distance
between the diagonal Gaussians fitted per condition, per token dimension, averaged over the
conditions of stage s (R_s of them):

  D_s(A, B) = 1/(R_s C) sum_r sum_c [(mu^A_rc - mu^B_rc)^2 + (sd^A_rc - sd^B_rc)^2]

With finite M this estimate is biased upwards (mu and sd carry sampling error), so it is read
against a noise floor measured the same way between two independent reference draws R1, R2:
floor_s = D_s(R1, R2). A k-step set S_k gets d_s(k) = (D_s(S_k, R1) + D_s(S_k, R2)) / 2, whose
expectation is the true distance plus the same kind of bias as the floor. The budget b is
relative to the floor: k is within budget at stage s when d_s(k) <= (1 + b) floor_s (b = 0:
indistinguishable from the reference at this probe size). The chosen count is the smallest
candidate k such that k and every larger candidate are within budget (robust to a noisy dip);
when no candidate is, the largest candidate is taken and the stage is reported over budget.

The schedule file (JSON, written atomically) holds the requested steps per AR stage and the
timestep clamp, plus the measurements; `disa-sample --steps-file`, `disa-bench --runs` and
`disa-evidence curves --runs` (`label=file:PATH`) read it with `load_schedule`. The step counts
are solver-agnostic (one count per stage); measuring them needs the system's stage conditions:
`measure_mar` gets them from the MAR sampler's `on_backbone` hook and samples the head with
`disa_jax.diffusion.ddpm.p_sample_loop` (the loop of `sample_head`, here with a per-row
guidance scale so every stage shares one compiled executable per step count).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence

import numpy as np

from disa_jax.diffusion.gaussian import NUM_TRAIN_TIMESTEPS
from disa_jax.errors import UserError

SCHEDULE_FORMAT = 'disa-tune-schedule'
SCHEDULE_VERSION = 1
DEFAULT_CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)


class TuneError(UserError):
  """Bad tuning input or a schedule file that cannot be used; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# The distance and the selection (pure numpy).

def moments(samples) -> tuple[np.ndarray, np.ndarray]:
  """samples [R, M, C] (M draws per condition) -> (mean [R, C], std [R, C], ddof=1)."""
  x = np.asarray(samples, np.float64)
  if x.ndim != 3 or x.shape[1] < 2:
    raise ValueError(f'samples must be [R, M>=2, C], got shape {x.shape}')
  return x.mean(axis=1), x.std(axis=1, ddof=1)


def gaussian_w2(a, b) -> float:
  """Mean over conditions and dimensions of the squared W2 distance between the diagonal
  Gaussians fitted to a [R, M, C] and b [R, M', C] (same R conditions, same C)."""
  (ma, sa), (mb, sb) = moments(a), moments(b)
  if ma.shape != mb.shape:
    raise ValueError(f'sample sets differ in conditions/dimensions: {ma.shape} vs {mb.shape}')
  return float(np.mean((ma - mb) ** 2 + (sa - sb) ** 2))


@dataclasses.dataclass(frozen=True)
class StageChoice:
  steps: int
  within_budget: bool
  floor: float
  distances: dict       # candidate -> d_s(k)


def choose_steps(distances: dict, floor: float, budget: float) -> StageChoice:
  """The fewest candidate steps k with d(k) <= (1 + budget) floor for k and every larger
  candidate; the largest candidate (over budget) when none qualifies."""
  if not distances:
    raise ValueError('no candidates')
  if not (math.isfinite(budget) and budget >= 0):
    raise TuneError(f'--budget must be a finite number >= 0, got {budget}')
  limit = (1.0 + budget) * floor
  ks = sorted(distances)
  chosen = None
  for k in reversed(ks):
    if distances[k] <= limit:
      chosen = k
    else:
      break
  if chosen is None:
    return StageChoice(ks[-1], False, floor, dict(distances))
  return StageChoice(chosen, True, floor, dict(distances))


# ----------------------------------------------------------------------------------------------
# The schedule file.

@dataclasses.dataclass(frozen=True)
class Schedule:
  """Requested steps per AR stage and the clamp (None = no clamp), plus what was measured."""

  steps: tuple[int, ...]
  max_timestep: int | None
  system: str = 'mar'
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_iter(self) -> int:
    return len(self.steps)

  def step_plan(self):
    from disa_jax.schedules import StepPlan

    return StepPlan(steps=tuple(self.steps), max_timestep=self.max_timestep)

  def to_json(self) -> dict:
    return {'format': SCHEDULE_FORMAT, 'version': SCHEDULE_VERSION, 'system': self.system,
            'num_iter': self.num_iter, 'steps': list(self.steps),
            'max_timestep': self.max_timestep, **self.info}


def save_schedule(path: str, schedule: Schedule, *, overwrite: bool = False) -> None:
  """Writes the schedule JSON atomically (temporary file, then rename)."""
  if os.path.isdir(path):
    raise TuneError(f'output {path} is a directory; give a file name such as tuned.json')
  if os.path.lexists(path) and not overwrite:
    raise TuneError(f'output {path} already exists; pass --overwrite or choose another --out')
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise TuneError(f'cannot write {path}: directory {parent} does not exist')
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      json.dump(schedule.to_json(), f, indent=2)
      f.write('\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _bad(path, problem):
  return TuneError(f'steps file {path}: {problem}')


def load_schedule(path: str, *, num_iter: int | None = None, system: str | None = None
                  ) -> Schedule:
  """Reads and checks a schedule file; every problem is a one-line TuneError naming the file."""
  if not os.path.exists(path):
    raise _bad(path, 'does not exist; write one with disa-tune --out=FILE')
  if os.path.isdir(path):
    raise _bad(path, 'is a directory, not a schedule file')
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _bad(path, f'is not a readable JSON schedule ({str(e).splitlines()[0]})') from None
  if not isinstance(data, dict) or data.get('format') != SCHEDULE_FORMAT:
    raise _bad(path, f'is not a {SCHEDULE_FORMAT} file (no "format": "{SCHEDULE_FORMAT}")')
  if data.get('version') != SCHEDULE_VERSION:
    raise _bad(path, f'has version {data.get("version")!r}; this disa_jax reads version '
               f'{SCHEDULE_VERSION}')
  steps = data.get('steps')
  if (not isinstance(steps, list) or not steps
      or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)):
    raise _bad(path, '"steps" must be a non-empty list of integers, one per AR stage')
  bad = [s for s in steps if not 1 <= s <= NUM_TRAIN_TIMESTEPS]
  if bad:
    raise _bad(path, f'step count {bad[0]} is out of range [1, {NUM_TRAIN_TIMESTEPS}]')
  if data.get('num_iter', len(steps)) != len(steps):
    raise _bad(path, f'"num_iter" is {data.get("num_iter")} but "steps" has {len(steps)} '
               'entries')
  mt = data.get('max_timestep')
  if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= 999):
    raise _bad(path, f'"max_timestep" must be null or an integer in [1, 999], got {mt!r}')
  sys_name = data.get('system', 'mar')
  if system is not None and sys_name != system:
    raise _bad(path, f'was tuned for system {sys_name!r}, not {system!r}')
  if num_iter is not None and num_iter != len(steps):
    raise _bad(path, f'has {len(steps)} AR stages but num_iter is {num_iter}; drop --num_iter '
               'or tune for this num_iter')
  info = {k: v for k, v in data.items()
          if k not in ('format', 'version', 'system', 'num_iter', 'steps', 'max_timestep')}
  return Schedule(tuple(steps), mt, sys_name, info)


# ----------------------------------------------------------------------------------------------
# MAR: the probe.

def _draw_head_impl(state, zc, zu, cfg_rows, key, tables, temperature, *, graphdef, num_steps,
               draws):
  """`draws` samples of the head for each condition row: zc, zu [R, Dd] (zu None without
  CFG), cfg_rows [R] -> tokens [R, draws, C]. Row r, draw j uses noise from fold_in(key, r * draws + j)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from disa_jax.diffusion.ddpm import p_sample_loop

  net = nnx.merge(graphdef, state).diffloss.net
  rows = zc.shape[0] * draws
  c = net.in_channels
  rep = lambda a: jnp.repeat(a, draws, axis=0)  # noqa: E731
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows, dtype=jnp.uint32))
  normal = lambda stream: jax.vmap(  # noqa: E731
    lambda k: jax.random.normal(jax.random.fold_in(k, stream), (c,)))(keys)
  x = p_sample_loop(net, rep(zc), None if zu is None else rep(zu), normal(0), tables,
                    num_steps=num_steps, cfg=rep(cfg_rows)[:, None], temperature=temperature,
                    noise_at=lambda i: normal(i + 1))
  return x.reshape(zc.shape[0], draws, c)


@functools.cache
def _draw_head():
  import jax

  return jax.jit(_draw_head_impl, static_argnames=('graphdef', 'num_steps', 'draws'))


def _stage_conditions(sampler, labels, key, *, reference_steps, max_timestep, cfg, cfg_schedule,
                      temperature):
  """Runs the reference schedule on the probe batch and collects, per AR stage, the conditions
  of its predicted tokens: list of (zc [R, Dd], zu [R, Dd], cfg scale)."""
  stages = []

  def keep(s, z, pred_pos, pred_valid):
    z = np.asarray(z)
    if z.ndim == 4:       # CFG: [B, 2, n_query, Dd]
      zc, zu = z[:, 0, :s.n_pred], z[:, 1, :s.n_pred]
    else:
      zc = zu = z[:, :s.n_pred]
    d = zc.shape[-1]
    stages.append((zc.reshape(-1, d), zu.reshape(-1, d), float(s.cfg)))

  sampler.generate(labels, key, steps=reference_steps, max_timestep=max_timestep, cfg=cfg,
                   cfg_schedule=cfg_schedule, temperature=temperature, on_backbone=keep)
  return stages


def measure_mar(sampler, labels, key, *, num_iter: int, max_timestep: int | None, cfg: float,
                cfg_schedule: str, temperature: float, reference_steps: int = 100,
                candidates: Sequence[int] = DEFAULT_CANDIDATES, draws: int = 16,
                progress=None) -> dict:
  """Per-stage distances of the probe (see the module docstring).

  Returns {'floor': [S], 'distances': {k: [S]}, 'conditions': [S]}: the stage conditions come
  from one run of the reference schedule (constant `reference_steps`) on `labels`."""
  import jax
  import jax.numpy as jnp

  from disa_jax.diffusion.ddpm import device_tables
  from disa_jax.diffusion.gaussian import spaced_schedule

  if draws < 2:
    raise TuneError(f'--draws must be >= 2 (a spread needs two samples), got {draws}')
  kc, kr1, kr2, kd = jax.random.split(key, 4)
  stages = _stage_conditions(sampler, labels, kc, reference_steps=[reference_steps] * num_iter,
                             max_timestep=max_timestep, cfg=cfg, cfg_schedule=cfg_schedule,
                             temperature=temperature)
  sizes = [zc.shape[0] for zc, _, _ in stages]
  bounds = np.cumsum([0, *sizes])
  zc = jnp.asarray(np.concatenate([s[0] for s in stages]))
  zu = jnp.asarray(np.concatenate([s[1] for s in stages]))
  cfg_rows = jnp.asarray(np.concatenate([np.full(n, c, np.float32)
                                         for n, (_, _, c) in zip(sizes, stages, strict=True)]))
  if cfg == 1.0:
    zu = None
  graphdef, state = sampler.graphdef, sampler.state

  def draw(k, sub):
    sched = spaced_schedule(int(k), max_timestep)
    out = _draw_head()(state, zc, zu, cfg_rows, sub, device_tables(int(k), max_timestep),
                     jnp.float32(temperature), graphdef=graphdef, num_steps=sched.num_steps,
                     draws=draws)
    return np.asarray(out)

  def per_stage(a, b):
    return [gaussian_w2(a[bounds[i]:bounds[i + 1]], b[bounds[i]:bounds[i + 1]])
            for i in range(len(stages))]

  ref1, ref2 = draw(reference_steps, kr1), draw(reference_steps, kr2)
  floor = per_stage(ref1, ref2)
  distances = {}
  for i, k in enumerate(sorted(set(int(c) for c in candidates))):
    s = draw(k, jax.random.fold_in(kd, i))
    distances[k] = [(x + y) / 2 for x, y in zip(per_stage(s, ref1), per_stage(s, ref2),
                                               strict=True)]
    if progress is not None:
      progress(k)
  return {'floor': floor, 'distances': distances, 'conditions': sizes}


def select_schedule(measured: dict, budget: float) -> tuple[list[int], list[StageChoice]]:
  """Steps per stage from `measure_mar`'s output and a budget relative to the noise floor."""
  choices = []
  for s, floor in enumerate(measured['floor']):
    choices.append(choose_steps({k: d[s] for k, d in measured['distances'].items()}, floor,
                                budget))
  return [c.steps for c in choices], choices


def check_candidates(candidates: Sequence[int], reference_steps: int) -> list[int]:
  ks = sorted(set(int(c) for c in candidates))
  if not ks:
    raise TuneError('--candidates is empty; give step counts such as 1,2,4,8,16')
  bad = [k for k in ks if not 1 <= k <= NUM_TRAIN_TIMESTEPS]
  if bad:
    raise TuneError(f'candidate step count {bad[0]} is out of range [1, {NUM_TRAIN_TIMESTEPS}]')
  if not 1 <= reference_steps <= NUM_TRAIN_TIMESTEPS:
    raise TuneError(f'--reference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got '
                    f'{reference_steps}')
  if ks[-1] > reference_steps:
    raise TuneError(f'candidate {ks[-1]} exceeds --reference_steps={reference_steps}; the '
                    'reference must take at least as many steps as every candidate')
  return ks
