"""DiSA step strategies and presets against the per-AR-step table of the spec."""

import csv

import pytest

from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.schedules import ScheduleError, resolve_steps, step_schedule


def _table(data_dir):
  rows = [r for r in (data_dir / 'mar_disa_k64_schedule.csv').read_text().splitlines()
          if not r.startswith('#')]
  return list(csv.DictReader(rows))


@pytest.mark.parametrize('strategy,col', [('linear', 'linear'), ('cosine', 'cosine'),
                                          ('two-stage', 'twostage')])
def test_k64_50_to_5_matches_official_table(data_dir, strategy, col):
  table = _table(data_dir)
  req = step_schedule(strategy, 64, 50, 5)
  assert req == [int(r[f'{col}_req']) for r in table]
  actual = [spaced_schedule(t, 950).num_steps for t in req]
  assert actual == [int(r[f'{col}_actual']) for r in table]


@pytest.mark.parametrize('num_iter,want', [
  (5, [50, 50, 5, 5, 5]),          # S = K - 1 = 4: upper while s < 2 (the middle step is late)
  (3, [50, 5, 5]),
  (4, [50, 50, 5, 5]),             # S = 3: s < 1.5
  (1, [5]),                        # S = 0: no early stage
])
def test_two_stage_split_odd_and_even(num_iter, want):
  """Official two-stage: upper steps while s < (K - 1) / 2, lower from there on (spec 4.3)."""
  assert step_schedule('two-stage', num_iter, 50, 5) == want


def test_constant_and_endpoints():
  assert step_schedule('constant', 10, 50, 5) == [5] * 10
  lin = step_schedule('linear', 64, 50, 5)
  assert lin[0] == 50 and lin[-1] == 5 and all(a >= b for a, b in zip(lin, lin[1:], strict=False))
  assert step_schedule('linear', 1, 50, 5) == [50]


def test_token_weighted_cost_matches_spec():
  # Spec 4.4: sum_s n_s * A_s for K=64 linear 50->5 = 5,246 actual / 5,372 requested.
  from disa_jax.systems.mar.plan import mask_schedule

  n = [s[2] for s in mask_schedule(64, 256)]
  req = step_schedule('linear', 64, 50, 5)
  assert sum(a * b for a, b in zip(n, req, strict=False)) == 5372
  assert sum(a * spaced_schedule(t, 950).num_steps for a, t in zip(n, req, strict=False)) == 5246
  cos = step_schedule('cosine', 64, 50, 5)
  assert sum(a * spaced_schedule(t, 950).num_steps for a, t in zip(n, cos, strict=False)) == 4891


def test_presets():
  mar = resolve_steps(num_iter=256, preset='mar', upper=100)
  assert mar.steps == (100,) * 256 and mar.max_timestep is None
  disa = resolve_steps(num_iter=64, preset='disa', upper=50, lower=5)
  assert disa.steps[0] == 50 and disa.max_timestep == 950
  explicit = resolve_steps(num_iter=3, preset='disa', steps='9,8,7')
  assert explicit.steps == (9, 8, 7) and explicit.max_timestep == 950
  assert resolve_steps(num_iter=2, steps=12, preset=None).steps == (12, 12)
  assert resolve_steps(num_iter=2, preset='disa', max_timestep=None).max_timestep is None


@pytest.mark.parametrize('kwargs,match', [
  (dict(strategy='linear', num_iter=64, upper=5, lower=50), 'must be >= lower'),
  (dict(strategy='nope', num_iter=64, upper=50, lower=5), 'unknown step strategy'),
  (dict(strategy='linear', num_iter=0, upper=50, lower=5), 'num_iter'),
  (dict(strategy='linear', num_iter=64, upper=50, lower=0), 'lower steps'),
])
def test_bad_schedules(kwargs, match):
  with pytest.raises(ScheduleError, match=match):
    step_schedule(**kwargs)


def test_bad_explicit_and_preset():
  with pytest.raises(ScheduleError, match='3 entries but num_iter is 4'):
    resolve_steps(num_iter=4, steps='5,5,5')
  with pytest.raises(ScheduleError, match='comma-separated integers'):
    resolve_steps(num_iter=2, steps='5,x')
  with pytest.raises(ScheduleError, match='unknown preset'):
    resolve_steps(num_iter=2, preset='fast')
