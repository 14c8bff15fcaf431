"""Cosine schedule, respacing and DiSA clamp against the spec's golden values."""

import numpy as np
import pytest

from disa_jax.diffusion.gaussian import (
  base_tables,
  cosine_betas,
  respaced_timesteps,
  space_timesteps,
  spaced_schedule,
)


def test_cosine_schedule_golden():
  tb = base_tables()
  ac = tb.alphas_cumprod
  np.testing.assert_allclose(ac[0], 0.999958716, rtol=1e-8)
  np.testing.assert_allclose(ac[499], 0.49384359, rtol=1e-7)
  np.testing.assert_allclose(ac[950], 5.82014927e-3, rtol=1e-7)
  np.testing.assert_allclose(ac[998], 2.42876691e-6, rtol=1e-7)
  np.testing.assert_allclose(ac[999], 2.42876691e-9, rtol=1e-7)
  betas = cosine_betas()
  np.testing.assert_allclose(betas[0], 4.128422482e-5, rtol=1e-8)
  assert betas[999] == 0.999 and (betas[:999] < 0.999).all()  # only the last beta is capped


def test_space_timesteps_matches_official_rounding():
  assert sorted(space_timesteps(1000, 5)) == [0, 250, 500, 749, 999]
  kept = sorted(space_timesteps(1000, '100'))
  assert len(kept) == 100
  assert kept[:12] == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101, 111]
  assert kept[-8:] == [928, 938, 949, 959, 969, 979, 989, 999]
  # Sections: "10,15,20" on 300 steps keeps 45 steps.
  assert len(space_timesteps(300, '10,15,20')) == 45
  with pytest.raises(ValueError, match='cannot divide'):
    space_timesteps(10, 20)


def test_spaced_100_golden_betas_and_logvar():
  sched = spaced_schedule(100)
  tb = sched.tables
  np.testing.assert_allclose(tb.betas[:3], [4.1284e-5, 6.7984e-4, 1.16552e-3], rtol=1e-4)
  np.testing.assert_allclose(tb.betas[97:], [0.555376, 0.749939, 0.99999], rtol=1e-5)
  np.testing.assert_allclose(tb.posterior_log_variance_clipped[:3],
                             [-10.15394511, -10.15394511, -7.71591137], rtol=1e-8)
  assert sched.num_steps == 100 and sched.timesteps[-1] == 999


@pytest.mark.parametrize('steps,max_t', [(1000, None), (100, None), (25, 950)])
def test_posterior_is_gaussian_conditioning(steps, max_t):
  """posterior mean coefficients and variance of q(x_{t-1} | x_t, x_0) derived independently:
  x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar') e1, x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e2, so
  given x0, Cov(x_{t-1}, x_t) = sqrt(alpha) (1 - abar'), Var(x_t) = 1 - abar, and conditioning
  gives coef2 = Cov / Var, coef1 = sqrt(abar') - coef2 sqrt(abar), var = (1 - abar') - Cov^2 / Var."""
  tb = spaced_schedule(steps, max_t).tables
  ac = tb.alphas_cumprod
  ac_prev = np.append(1.0, ac[:-1])
  alpha = ac / ac_prev
  cov, var_t = np.sqrt(alpha) * (1 - ac_prev), 1 - ac
  coef2 = cov / var_t
  np.testing.assert_allclose(tb.posterior_mean_coef2, coef2, rtol=1e-10)
  np.testing.assert_allclose(tb.posterior_mean_coef1, np.sqrt(ac_prev) - coef2 * np.sqrt(ac),
                             rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(tb.posterior_variance, (1 - ac_prev) - cov**2 / var_t,
                             rtol=1e-8, atol=1e-15)
  table = spaced_schedule(steps, max_t).sampling_tables()
  np.testing.assert_allclose(table['coef2'], coef2[::-1].astype(np.float32), rtol=1e-6)


def _golden(data_dir):
  """{'disa': {T: (actual, kept)}, 'mar': {...}} from the spec's timestep table."""
  out, section = {'disa': {}, 'mar': {}}, 'disa'
  for line in (data_dir / 'disa_respaced_timesteps.txt').read_text().splitlines():
    if line.startswith('# Original MAR default'):
      section = 'mar'
    if line.startswith('T='):
      t, actual, kept = line.split('\t')
      out[section][int(t[2:])] = (int(actual.split('=')[1]),
                                  [int(x) for x in kept.strip('[]').split(',')])
  return out


def test_disa_clamped_timesteps_all_T(data_dir):
  tables = _golden(data_dir)
  golden = tables['disa']
  assert sorted(golden) == list(range(5, 51))
  for t, (actual, kept) in golden.items():
    got = respaced_timesteps(t, 950)
    assert list(got) == kept, t
    assert len(got) == actual == spaced_schedule(t, 950).num_steps
  # Without the clamp (original MAR) only values above 950 differ.
  assert list(respaced_timesteps(5)) == [0, 250, 500, 749, 999]
  for t, (actual, kept) in tables['mar'].items():
    assert list(respaced_timesteps(t)) == kept and len(kept) == actual


def test_sampling_tables_order_and_dtype():
  tables = spaced_schedule(10, 950).sampling_tables()
  assert tables['t'][0] == 950 and tables['t'][-1] == 0     # noisiest first
  assert tables['noise_mask'][-1] == 0 and tables['noise_mask'][:-1].all()
  assert all(v.dtype == np.float32 and v.shape == (10,) for v in tables.values())


@pytest.mark.parametrize('bad', [0, -3, 1001])
def test_bad_step_counts(bad):
  with pytest.raises(ValueError, match='diffusion steps'):
    respaced_timesteps(bad)
