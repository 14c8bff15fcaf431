"""Per-scale flow-step counts of FlowAR: the official DiSA formula, presets and strategies.

Official (DiSA's `FlowAR.sample_tokens`): with U = flow_upper_steps, Lo = flow_lower_steps and
S = number of scales - 1 (= 4), scale s requests
  T_s = int((U - Lo) * (S - s) / S + Lo)        (Python floats, left to right)
e.g. 25 -> 15: 25, 22, 20, 17, 15; 50 -> 15: 50, 41, 32, 23, 15. Each T_s then goes through the
Euler grid rule (`disa_jax.diffusion.flow.flowar_time_grid`): 24/22/20/16/14 and 50/40/32/22/14
evaluations. Presets:
  baseline  the official FlowAR README: `upper` steps at every scale (S/L 25, H 50)
  disa      the DiSA README: 25 -> 15 (S, L), 50 -> 15 (H), linear over scales
Other shapes: the shared strategies of `disa_jax.schedules.step_schedule` (constant, linear,
cosine, two-stage) or an explicit per-scale list.
"""

from __future__ import annotations

from collections.abc import Sequence

from disa_jax.errors import UserError
from disa_jax.schedules import ScheduleError, explicit_schedule, step_schedule
from disa_jax.systems.flowar.config import OFFICIAL_SAMPLING

PRESETS = ('baseline', 'disa')
MIN_STEPS = 2


def disa_scale_steps(upper: int, lower: int, num_scales: int = 5) -> list[int]:
  """The official per-scale formula T_s = int((U - Lo) * (S - s) / S + Lo)."""
  last = num_scales - 1
  if last == 0:
    return [upper]
  return [int((upper - lower) * (last - s) / last + lower) for s in range(num_scales)]


def _official(variant: str):
  key = variant.upper()
  if key not in OFFICIAL_SAMPLING:
    raise UserError(f'unknown FlowAR variant {variant!r} for a step preset; choose S, L or H')
  return OFFICIAL_SAMPLING[key]


def preset_steps(preset: str, variant: str, num_scales: int = 5) -> list[int]:
  """Requested steps per scale of a preset ('baseline' or 'disa') for variant S / L / H."""
  s = _official(variant)
  if preset == 'baseline':
    return [s.upper] * num_scales
  if preset == 'disa':
    return disa_scale_steps(s.upper, s.lower, num_scales)
  raise UserError(f'unknown FlowAR step preset {preset!r}; choose one of {", ".join(PRESETS)}')


def resolve_scale_steps(*, num_scales: int = 5, variant: str = 'S', preset: str | None = 'disa',
                        strategy: str | None = None, upper: int | None = None,
                        lower: int | None = None,
                        steps: Sequence[int] | str | int | None = None) -> list[int]:
  """Requested steps per scale: an explicit `steps` list/int wins, then `strategy`, then
  `preset`; `upper` / `lower` default to the variant's official values (DiSA README)."""
  try:
    if steps is not None and not (isinstance(steps, str) and not steps.strip()):
      if isinstance(steps, int) and not isinstance(steps, bool):
        out = [steps] * num_scales
      else:
        out = explicit_schedule(steps, num_scales)
    elif strategy is not None:
      off = _official(variant)
      out = step_schedule(strategy, num_scales, off.upper if upper is None else upper,
                          off.lower if lower is None else lower)
    elif preset is None:
      raise UserError('give a FlowAR step preset, a strategy or explicit steps')
    elif upper is None and lower is None:
      out = preset_steps(preset, variant, num_scales)
    else:   # a preset with its upper / lower counts overridden
      off = _official(variant)
      up = off.upper if upper is None else upper
      lo = off.lower if lower is None else lower
      if preset not in PRESETS:
        preset_steps(preset, variant, num_scales)        # raises the unknown-preset error
      if preset == 'baseline':
        out = [up] * num_scales
      else:
        step_schedule('linear', num_scales, up, lo)     # validates (upper >= lower, ints)
        out = disa_scale_steps(up, lo, num_scales)
  except ScheduleError as e:
    raise UserError(str(e)) from None
  bad = [n for n in out if n < MIN_STEPS]
  if bad:
    raise UserError(f'FlowAR needs at least {MIN_STEPS} flow steps per scale, got {out}; '
                    'raise the lower step count')
  return out


def steps_from_config(sampling, variant: str) -> list[int]:
  """Requested steps per scale from a config's `sampling` section (`configs/flowar/*.py`)."""
  return resolve_scale_steps(variant=variant, preset=sampling.preset,
                             strategy=sampling.strategy or None, upper=sampling.upper_steps,
                             lower=sampling.lower_steps, steps=sampling.steps or None)
