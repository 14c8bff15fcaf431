"""Diffusion training loss of MAR's head: eps-MSE + variational bound (learned-range variance).

Matches `GaussianDiffusion.training_losses` of LTH14/mar `diffusion/gaussian_diffusion.py`
with the settings MAR uses (cosine betas, 1000 steps, ModelMeanType.EPSILON,
ModelVarType.LEARNED_RANGE, LossType.MSE), per row of x_start [N, C]:

  x_t   = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
  [eps_hat, v] = net(x_t, t)
  mse   = mean_c (eps - eps_hat)^2
  vb    = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits, mean over c       (t > 0)
          -log p(x_0 | x_1) of a discretised Gaussian (bin width 2/255), in bits  (t = 0)
          where p uses stop_gradient(eps_hat) and log var = frac log beta_t + (1 - frac) log
          sigma~^2_t (clipped), frac = (v + 1) / 2   -- the VB term only trains v
  loss  = mse + vb

The coefficient tables are the float64 host tables of `base_tables()`, gathered per row and
used in float32 (as the official code casts `_extract_into_tensor` results).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from disa_jax.diffusion.gaussian import base_tables

_LOSS_TABLES = ('sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
                'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
                'posterior_mean_coef1', 'posterior_mean_coef2',
                'posterior_log_variance_clipped', 'log_betas')


def loss_tables(num_timesteps: int = 1000) -> dict[str, np.ndarray]:
  """float32 [T] tables used by `training_losses` (from `base_tables`)."""
  tb = base_tables(num_timesteps)
  out = {k: getattr(tb, k) for k in _LOSS_TABLES if k != 'log_betas'}
  out['log_betas'] = np.log(tb.betas)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF the official code uses."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of a Gaussian discretised to 256 bins on [-1, 1] (nats, elementwise)."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def training_losses(model_output, x_start, t, noise, tables=None) -> dict[str, jax.Array]:
  """Per-row losses from the net output [N, 2C] at x_t = q_sample(x_start, t, noise).

  x_start, noise [N, C] float; t [N] int in [0, T). Returns {'loss', 'mse', 'vb'} each [N]
  (float32). `tables` defaults to `loss_tables()`.
  """
  tb = tables if tables is not None else loss_tables()
  g = {k: jnp.asarray(v)[t][:, None] for k, v in tb.items()}
  x_start = x_start.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  out = model_output.astype(jnp.float32)
  c = x_start.shape[-1]
  eps, v = out[:, :c], out[:, c:]
  x_t = g['sqrt_alphas_cumprod'] * x_start + g['sqrt_one_minus_alphas_cumprod'] * noise

  # Variational bound: the mean comes from the frozen eps, only v gets gradients.
  frozen_eps = jax.lax.stop_gradient(eps)
  frac = (v + 1.0) / 2.0
  model_logvar = frac * g['log_betas'] + (1.0 - frac) * g['posterior_log_variance_clipped']
  pred_x0 = g['sqrt_recip_alphas_cumprod'] * x_t - g['sqrt_recipm1_alphas_cumprod'] * frozen_eps
  model_mean = g['posterior_mean_coef1'] * pred_x0 + g['posterior_mean_coef2'] * x_t
  true_mean = g['posterior_mean_coef1'] * x_start + g['posterior_mean_coef2'] * x_t
  true_logvar = g['posterior_log_variance_clipped']
  kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_logvar)
  nll = _mean_flat(nll) / math.log(2.0)
  vb = jnp.where(t == 0, nll, kl)

  mse = _mean_flat((noise - eps) ** 2)
  return {'loss': mse + vb, 'mse': mse, 'vb': vb}


def q_sample(x_start, t, noise, tables=None):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for rows x_start [N, C], t [N]."""
  tb = tables if tables is not None else loss_tables()
  a = jnp.asarray(tb['sqrt_alphas_cumprod'])[t][:, None]
  s = jnp.asarray(tb['sqrt_one_minus_alphas_cumprod'])[t][:, None]
  return a * x_start.astype(jnp.float32) + s * noise.astype(jnp.float32)


def diffusion_loss(net, target, z, mask, key, *, num_timesteps: int = 1000, tables=None,
                   last_t_fraction: float = 0.0):
  """MAR's `DiffLoss.forward`: random t ~ U{0..T-1} and noise per row, masked mean.

  net(x [N, C], t [N], c [N, Dz]) -> [N, 2C]; target [N, C]; z [N, Dz]; mask [N] (1 = counts).
  `last_t_fraction` > 0 (not in the official recipe; 0 keeps it exactly, same random draws)
  moves that fraction of the rows, on average, to t = T-1 with the eps-MSE term only: the
  only timestep the first step of an un-clamped sampler evaluates, where the posterior mean
  moves ~300x the eps error (docs/benchmarks.md, "Real MNIST model").
  Returns (scalar loss, dict of masked means of 'loss', 'mse', 'vb').
  """
  kt, kn = jax.random.split(key)
  n = target.shape[0]
  t = jax.random.randint(kt, (n,), 0, num_timesteps)
  last = None
  if last_t_fraction > 0:
    last = jax.random.bernoulli(jax.random.fold_in(kt, 1), last_t_fraction, (n,))
    t = jnp.where(last, num_timesteps - 1, t)
  noise = jax.random.normal(kn, target.shape, jnp.float32)
  tb = tables if tables is not None else loss_tables(num_timesteps)
  x_t = q_sample(target, t, noise, tb)
  out = net(x_t, t.astype(jnp.float32), z)
  terms = training_losses(out, target, t, noise, tb)
  if last is not None:  # the added rows train eps only: their VB term (which trains the
    # variance) is ~1e2 at T-1 and would dominate the clipped gradient
    terms['vb'] = jnp.where(last, 0.0, terms['vb'])
    terms['loss'] = terms['mse'] + terms['vb']
  mask = mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  means = {k: (v * mask).sum() / denom for k, v in terms.items()}
  return means['loss'], means
