"""DiSA step-count schedules: how many diffusion steps each AR step requests.

Reference: Qinyu-Allen-Zhao/DiSA `MAR_DiSA/models/diffloss.py` (`DiffLoss.sample`). With
T_hi = upper, T_lo = lower, n = T_hi - T_lo + 1 and S = num_iter - 1, AR step s requests
T_lo + id(s) steps where (int() truncates toward zero):

  linear     id = int((S - s) / S * (n - 1))
  cosine     id = int((cos(pi * s / S) + 1) / 2 * (n - 1))
  two-stage  id = n - 1 if s < S / 2 else 0
  constant   id = 0                        (T_lo for every AR step)

The step count depends only on the AR step index, never on how many tokens remain. The
*requested* count becomes fewer actual network evaluations under DiSA's 950 timestep clamp
(see `disa_jax.diffusion.gaussian.respaced_timesteps`).

Presets bundle a schedule with its clamp so both papers' settings are one flag away (the step
counts are solver-agnostic: one count per AR stage, whatever the inner solver):
  `baseline` (alias `mar`)  original MAR: `upper` steps at every AR step, no clamp (K=256, 100 steps in the paper)
  `disa`      DiSA: `strategy` from `upper` to `lower`, timesteps clamped at 950 (K=64, 50->5)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from disa_jax.diffusion.gaussian import DISA_MAX_TIMESTEP, NUM_TRAIN_TIMESTEPS
from disa_jax.errors import UserError

STRATEGIES = ('constant', 'linear', 'cosine', 'two-stage')
PRESETS = ('baseline', 'disa')
PRESET_ALIASES = {'mar': 'baseline'}   # the original name of the baseline preset, still accepted


def canonical_preset(preset: str | None) -> str | None:
  """'mar' -> 'baseline'; other names unchanged."""
  return PRESET_ALIASES.get(preset, preset)


class ScheduleError(UserError):
  """A step schedule that cannot be built; the message names the fix."""


def _check_int(name, value, lo, hi=None):
  if isinstance(value, bool) or not isinstance(value, int):
    try:
      if float(value) != int(value):
        raise ValueError
      value = int(value)
    except (TypeError, ValueError):
      raise ScheduleError(f'{name} must be an integer, got {value!r}') from None
  if value < lo or (hi is not None and value > hi):
    rng = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    raise ScheduleError(f'{name} must be {rng}, got {value}')
  return value


def step_schedule(strategy: str, num_iter: int, upper: int, lower: int) -> list[int]:
  """Requested diffusion steps for each of `num_iter` AR steps (a list of length num_iter)."""
  num_iter = _check_int('num_iter', num_iter, 1)
  lower = _check_int('lower steps', lower, 1, NUM_TRAIN_TIMESTEPS)
  upper = _check_int('upper steps', upper, 1, NUM_TRAIN_TIMESTEPS)
  if upper < lower:
    raise ScheduleError(
      f'upper steps ({upper}) must be >= lower steps ({lower}); swap them or set both equal'
    )
  n = upper - lower + 1
  last = num_iter - 1
  out = []
  for s in range(num_iter):
    if strategy == 'linear':
      sid = n - 1 if last == 0 else int((last - s) / last * (n - 1))
    elif strategy == 'cosine':
      sid = n - 1 if last == 0 else int((math.cos(math.pi * s / last) + 1) / 2 * (n - 1))
    elif strategy == 'two-stage':
      sid = n - 1 if s < last / 2 else 0
    elif strategy == 'constant':
      sid = 0
    else:
      raise ScheduleError(
        f'unknown step strategy {strategy!r}; choose one of {", ".join(STRATEGIES)}'
      )
    out.append(lower + sid)
  return out


def explicit_schedule(steps: Sequence[int] | str, num_iter: int) -> list[int]:
  """Validates an explicit per-AR-step list ("50,48,..." or a sequence) of length num_iter."""
  if isinstance(steps, str):
    try:
      steps = [int(x) for x in steps.replace(' ', '').split(',') if x]
    except ValueError:
      raise ScheduleError(
        f'explicit steps must be comma-separated integers, got {steps!r}'
      ) from None
  steps = [_check_int('diffusion steps', s, 1, NUM_TRAIN_TIMESTEPS) for s in steps]
  if len(steps) != num_iter:
    raise ScheduleError(
      f'explicit step list has {len(steps)} entries but num_iter is {num_iter}; give one per AR step'
    )
  return steps


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What the sampler needs from a preset: requested steps per AR step and the clamp."""

  steps: tuple[int, ...]
  max_timestep: int | None

  @property
  def num_iter(self) -> int:
    return len(self.steps)


def resolve_steps(
  *,
  num_iter: int,
  preset: str | None = 'disa',
  strategy: str = 'linear',
  upper: int = 50,
  lower: int = 5,
  steps: Sequence[int] | str | int | None = None,
  max_timestep: int | None | str = 'preset',
) -> StepPlan:
  """Turns user-facing schedule options into a `StepPlan`.

  `steps` (an int or explicit list) overrides the strategy. `max_timestep='preset'` takes the
  preset's clamp (950 for `disa`, none for `mar`); an int or None sets it explicitly.
  """
  num_iter = _check_int('num_iter', num_iter, 1)
  preset = canonical_preset(preset)
  if preset not in (*PRESETS, None):
    raise ScheduleError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)} '
                        '(mar = baseline)')
  if steps is not None and not (isinstance(steps, str) and not steps.strip()):
    if isinstance(steps, int | float) and not isinstance(steps, bool):
      plan = [_check_int('diffusion steps', steps, 1, NUM_TRAIN_TIMESTEPS)] * num_iter
    else:
      plan = explicit_schedule(steps, num_iter)
  elif preset == 'baseline':
    plan = [_check_int('upper steps', upper, 1, NUM_TRAIN_TIMESTEPS)] * num_iter
  else:
    plan = step_schedule(strategy, num_iter, upper, lower)
  if max_timestep == 'preset':
    max_timestep = DISA_MAX_TIMESTEP if preset == 'disa' else None
  elif max_timestep is not None:
    max_timestep = _check_int('max_timestep', max_timestep, 0)
  return StepPlan(steps=tuple(plan), max_timestep=max_timestep)


class RunSpecError(UserError):
  """A malformed `label=preset:num_iter:upper[:lower[:strategy]]` run spec."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One sampling run of `disa-bench --runs` / `disa-evidence curves --runs`:
  `label=preset:num_iter:upper[:lower[:strategy]]`, or `label=file:PATH` for a schedule file
  written by `disa-tune` (preset and strategy 'tuned'; upper / lower = its largest / smallest
  step count)."""

  label: str
  preset: str
  num_iter: int
  upper: int
  lower: int
  strategy: str
  steps_file: str | None = None

  @classmethod
  def parse(cls, text: str) -> RunSpec:
    label, eq, body = text.partition('=')
    if not eq:
      body, label = label, label.replace(':', '_')
    if body.startswith('file:'):
      from disa_jax.tune import load_schedule

      path = body[len('file:'):]
      sched = load_schedule(path)
      return cls(label, 'tuned', sched.num_iter, max(sched.steps), min(sched.steps), 'tuned',
                 path)
    parts = body.split(':')
    if len(parts) < 3 or parts[0] not in ('mar', 'baseline', 'disa'):
      raise RunSpecError(
        f'bad run spec {text!r}; expected label=preset:num_iter:upper[:lower[:strategy]] with '
        'preset baseline (or mar) or disa, e.g. disa64=disa:64:50:5:linear, or label=file:PATH '
        '(a disa-tune schedule)')
    try:
      num_iter, upper = int(parts[1]), int(parts[2])
      lower = int(parts[3]) if len(parts) > 3 else upper
    except ValueError:
      raise RunSpecError(f'bad run spec {text!r}: num_iter/upper/lower must be ints') from None
    strategy = parts[4] if len(parts) > 4 else ('constant' if parts[0] != 'disa' else 'linear')
    return cls(label, parts[0], num_iter, upper, lower, strategy)

  @property
  def family(self) -> str:
    if canonical_preset(self.preset) == 'baseline':
      return 'MAR (constant steps)'
    if self.steps_file is not None:
      return 'tuned (disa-tune)'
    if self.strategy == 'constant':    # fixed steps with DiSA's clamp: isolates the clamp
      return 'constant steps + clamp 950'
    return f'DiSA {self.strategy}'

  def step_plan(self) -> StepPlan:
    if self.steps_file is not None:
      from disa_jax.tune import load_schedule

      return load_schedule(self.steps_file).step_plan()
    return resolve_steps(num_iter=self.num_iter, preset=self.preset, strategy=self.strategy,
                         upper=self.upper, lower=self.lower)
