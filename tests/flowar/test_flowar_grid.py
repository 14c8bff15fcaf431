"""FlowAR time grids, integer timesteps, guidance flags and per-scale step counts vs the spec's
golden values (flowar_xar.md §4.3 - §4.5) and vs the torch reference sampler's grid."""

import numpy as np
import pytest

from disa_jax.diffusion.flow import (
  euler_maruyama_grid,
  flowar_euler_plan,
  flowar_time_grid,
  num_evaluations,
  time_to_tau,
)
from disa_jax.errors import UserError
from disa_jax.schedules import step_schedule
from disa_jax.systems.flowar.steps import disa_scale_steps, preset_steps, resolve_scale_steps
from reference.flowar import time_grid as torch_time_grid

# n: (evaluations, k(0.9), k(0.7), tau per step) from spec §4.3.
GOLDEN = {
  15: (14, 1, 3, '1000 883 766 650 533 416 300 250 214 178 142 107 71 35'),
  17: (16, 1, 4, '1000 900 800 700 600 500 400 300 250 218 187 156 125 93 62 31'),
  20: (20, 2, 4, '1000 922 844 766 688 611 533 455 377 300 250 225 200 175 150 125 100 75 50 25'),
  22: (22, 2, 5, '1000 930 860 790 720 650 580 510 440 370 300 250 227 204 181 159 136 113 90 68 '
                 '45 22'),
  23: (22, 2, 5, '1000 930 860 790 720 650 580 510 440 370 300 250 227 204 181 159 136 113 90 68 '
                 '45 22'),
  25: (24, 2, 5, '1000 936 872 809 745 681 618 554 490 427 363 300 250 229 208 187 166 145 125 104 '
                 '83 62 41 20'),
  32: (32, 3, 7, '1000 953 906 860 813 766 720 673 626 580 533 486 440 393 346 300 250 234 218 '
                 '203 187 171 156 140 125 109 93 78 62 46 31 15'),
  41: (40, 3, 9, '1000 963 926 889 852 815 778 742 705 668 631 594 557 521 484 447 410 373 336 '
                 '300 250 237 225 212 200 187 175 162 150 137 125 112 100 87 75 62 50 37 25 12'),
  50: (50, 5, 15, ' '.join(str(1000 - 20 * i) for i in range(50))),
}


@pytest.mark.parametrize('n', sorted(GOLDEN))
def test_grid_matches_golden(n):
  evals, k9, k7, taus = GOLDEN[n]
  assert num_evaluations(n) == evals
  plan9 = flowar_euler_plan(n, cfg=2.0, guidance_high=0.9)
  assert plan9.tau.tolist() == [int(t) for t in taus.split()]
  assert int((~plan9.guided).sum()) == k9
  assert plan9.guided[k9:].all()
  k7_here = int((~flowar_euler_plan(n, cfg=2.0, guidance_high=0.7).guided).sum())
  if n == 17:
    # The one documented ulp case (spec §4.3 (*)): torch's vectorised CPU linspace gives
    # 0.7000000000000001 at index 3 (unguided), the two-halves formula 0.7 (guided). Not a
    # README configuration (n = 17 only occurs with guidance 0.9).
    assert k7_here == 3
  else:
    assert k7_here == k7
  # the float32 times fed to the network equal the torch grid's exactly
  assert np.array_equal(flowar_time_grid(n).astype(np.float32),
                        torch_time_grid(n).numpy().astype(np.float32))
  np.testing.assert_allclose(flowar_time_grid(n), torch_time_grid(n).numpy(), rtol=0, atol=1e-15)


def test_grid_shape_odd_steps_and_jump():
  g = flowar_time_grid(25)
  assert len(g) == 25 and g[0] == 1.0 and g[-1] == 0.0          # 24 evaluations, not 25
  np.testing.assert_allclose(g[11:13], [0.3, 0.25])               # the jump 0.30 -> 0.25
  np.testing.assert_allclose(g[:24].round(6), [
    1, .936364, .872727, .809091, .745455, .681818, .618182, .554545, .490909, .427273, .363636,
    .3, .25, .229167, .208333, .1875, .166667, .145833, .125, .104167, .083333, .0625, .041667,
    .020833], atol=1e-12)
  assert len(flowar_time_grid(50)) == 51                          # the n == 50 special case
  np.testing.assert_allclose(np.diff(flowar_time_grid(50)), -0.02)


def test_tau_is_fp32_product_truncated():
  # trunc(1000 t) in float64 gives 649 here; the network computes 650 (spec §2.6)
  t = flowar_time_grid(15)[3]
  assert int(np.trunc(t * 1000)) == 649
  assert int(time_to_tau(t)) == 650
  assert time_to_tau(np.array([1.0, 0.0])).tolist() == [1000, 0]


def test_unguided_without_cfg():
  assert not flowar_euler_plan(25, cfg=1.0, guidance_high=0.9).guided.any()


def test_euler_maruyama_grid():
  g = euler_maruyama_grid(15)
  assert len(g) == 16 and g[-2] == pytest.approx(0.04) and g[-1] == 0.0
  assert time_to_tau(g[:-1]).tolist() == [int(t) for t in
                                          '1000 931 862 794 725 657 588 520 451 382 314 245 177 '
                                          '108 40'.split()]


def test_disa_formula_and_presets():
  assert disa_scale_steps(25, 15) == [25, 22, 20, 17, 15]
  assert disa_scale_steps(50, 15) == [50, 41, 32, 23, 15]
  assert [num_evaluations(n) for n in disa_scale_steps(25, 15)] == [24, 22, 20, 16, 14]
  assert [num_evaluations(n) for n in disa_scale_steps(50, 15)] == [50, 40, 32, 22, 14]
  assert preset_steps('baseline', 'S') == [25] * 5
  assert preset_steps('baseline', 'H') == [50] * 5
  assert preset_steps('disa', 'L') == [25, 22, 20, 17, 15]
  assert preset_steps('disa', 'H') == [50, 41, 32, 23, 15]
  # the shared 'linear' strategy is the official formula for every U >= Lo <= 100
  for up in range(2, 101, 7):
    for lo in range(2, up + 1, 5):
      assert step_schedule('linear', 5, up, lo) == disa_scale_steps(up, lo)


def test_head_token_evaluations_match_spec():
  sides = [1, 2, 4, 8, 16]

  def token_evals(steps):
    return sum(s * s * num_evaluations(n) for s, n in zip(sides, steps, strict=True))

  assert token_evals(preset_steps('baseline', 'S')) == 8184
  assert token_evals(preset_steps('disa', 'S')) == 5040
  assert token_evals(preset_steps('baseline', 'H')) == 17050
  assert token_evals(preset_steps('disa', 'H')) == 5714


def test_resolve_scale_steps():
  assert resolve_scale_steps(steps='30,25,20,15,10') == [30, 25, 20, 15, 10]
  assert resolve_scale_steps(steps=12) == [12] * 5
  assert resolve_scale_steps(variant='H', strategy='constant') == [15] * 5
  assert resolve_scale_steps(variant='S', strategy='two-stage', upper=30, lower=10) == \
    [30, 30, 10, 10, 10]
  with pytest.raises(UserError, match='entries'):
    resolve_scale_steps(steps='30,25')
  with pytest.raises(UserError, match='at least 2'):
    resolve_scale_steps(steps=[5, 4, 3, 2, 1])
  with pytest.raises(UserError, match='preset'):
    resolve_scale_steps(preset='fast')


def test_cfg_ramp_over_the_five_scales():
  """Spec: cfg_s = 1 + (cfg - 1) s / 4 over FlowAR's 5 scales; scale 0 is never guided and the
  last scale gets the full cfg."""
  from disa_jax.systems.flowar.sampling import scale_cfg

  assert [scale_cfg(3.0, s, 5) for s in range(5)] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
  assert [scale_cfg(4.6, s, 5) for s in (0, 4)] == pytest.approx([1.0, 4.6])
