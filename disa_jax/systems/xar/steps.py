"""Per-cell flow-step counts of xAR: the official DiSA formula, presets and strategies.

Official (DiSA's `xAR.sample_tokens(cfg, label, flow_upper_steps, flow_lower_steps)`): with
U = upper, Lo = lower and S = cells - 1 (= 3), cell s runs
  n_s = int((S - s) / S * (U - Lo) + Lo)        (Python floats, left to right)
Euler-Maruyama evaluations (`disa_jax.diffusion.flow.euler_maruyama_grid`; n_s >= 3), e.g.
50 -> 15: 50, 38, 26, 15. Presets:
  baseline  the xAR README: the same count in every cell (B 40, L / H 50)
  disa      the DiSA README: 50 -> 15 for every size, linear over cells
Other shapes: the shared strategies of `disa_jax.schedules.step_schedule` (constant, linear,
cosine, two-stage) between upper and lower, or an explicit per-cell list.
"""

from __future__ import annotations

from collections.abc import Sequence

from disa_jax.errors import UserError
from disa_jax.schedules import ScheduleError, explicit_schedule, step_schedule
from disa_jax.systems.xar.config import OFFICIAL_SAMPLING, variant_key

PRESETS = ('baseline', 'disa')
MIN_STEPS = 3


def disa_cell_steps(upper: int, lower: int, num_cells: int = 4) -> list[int]:
  """The official per-cell formula n_s = int((S - s) / S * (U - Lo) + Lo), S = cells - 1."""
  last = num_cells - 1
  if last == 0:
    return [upper]
  return [int((last - s) / last * (upper - lower) + lower) for s in range(num_cells)]


def preset_steps(preset: str, variant: str, num_cells: int = 4) -> list[int]:
  """Steps per cell of a preset ('baseline' or 'disa') for variant B / L / H."""
  off = OFFICIAL_SAMPLING[variant_key(variant)]
  if preset == 'baseline':
    return [off.baseline_steps] * num_cells
  if preset == 'disa':
    return disa_cell_steps(off.upper, off.lower, num_cells)
  raise UserError(f'unknown xAR step preset {preset!r}; choose one of {", ".join(PRESETS)}')


def resolve_cell_steps(*, num_cells: int = 4, variant: str = 'B', preset: str | None = 'disa',
                       strategy: str | None = None, upper: int | None = None,
                       lower: int | None = None, baseline: int | None = None,
                       steps: Sequence[int] | str | int | None = None) -> list[int]:
  """Steps per cell: an explicit `steps` list / int wins, then `strategy` (between upper and
  lower), then `preset` (baseline: `baseline` steps everywhere; disa: upper -> lower with the
  official formula); unset counts default to the variant's README values."""
  off = OFFICIAL_SAMPLING[variant_key(variant)]
  up = off.upper if upper is None else upper
  lo = off.lower if lower is None else lower
  try:
    if steps is not None and not (isinstance(steps, str) and not steps.strip()):
      if isinstance(steps, int) and not isinstance(steps, bool):
        out = [steps] * num_cells
      else:
        out = explicit_schedule(steps, num_cells)
    elif strategy:
      out = step_schedule(strategy, num_cells, up, lo)
    elif preset == 'baseline':
      out = [off.baseline_steps if baseline is None else int(baseline)] * num_cells
    elif preset == 'disa':
      step_schedule('linear', num_cells, up, lo)          # validates (ints, upper >= lower)
      out = disa_cell_steps(up, lo, num_cells)
    else:
      raise UserError(f'unknown xAR step preset {preset!r}; choose one of '
                      f'{", ".join(PRESETS)}')
  except ScheduleError as e:
    raise UserError(str(e)) from None
  bad = [n for n in out if n < MIN_STEPS]
  if bad:
    raise UserError(f'xAR needs at least {MIN_STEPS} flow steps per cell (the official '
                    f'Euler-Maruyama sampler), got {out}; raise the lower step count')
  return out


def steps_from_config(sampling, variant: str) -> list[int]:
  """Steps per cell from a config's `sampling` section (`configs/xar/*.py`)."""
  return resolve_cell_steps(variant=variant, preset=sampling.preset,
                            strategy=sampling.strategy or None, upper=sampling.upper_steps,
                            lower=sampling.lower_steps, baseline=sampling.baseline_steps,
                            steps=sampling.steps or None)
