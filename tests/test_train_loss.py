"""Training-loss pieces against the official formulas (LTH14/mar diffusion/, models/mar.py,
util/misc.py add_weight_decay)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disa_jax.diffusion import losses
from disa_jax.diffusion.gaussian import base_tables
from disa_jax.train import optim, step


def _official_losses_torch(model_output, x_start, t, noise):
  """GaussianDiffusion.training_losses (EPSILON, LEARNED_RANGE, MSE) written with torch in
  float64 from the official formulas."""
  th = pytest.importorskip('torch')
  tb = base_tables()

  def ex(arr):
    return th.from_numpy(np.asarray(arr, np.float64))[th.from_numpy(t)][:, None]

  x0 = th.from_numpy(x_start.astype(np.float64))
  eps = th.from_numpy(noise.astype(np.float64))
  out = th.from_numpy(model_output.astype(np.float64))
  c = x0.shape[1]
  x_t = ex(tb.sqrt_alphas_cumprod) * x0 + ex(tb.sqrt_one_minus_alphas_cumprod) * eps
  eps_hat, v = out[:, :c], out[:, c:]
  min_log = ex(tb.posterior_log_variance_clipped)
  max_log = ex(np.log(tb.betas))
  frac = (v + 1) / 2
  logvar = frac * max_log + (1 - frac) * min_log
  pred_x0 = ex(tb.sqrt_recip_alphas_cumprod) * x_t - ex(tb.sqrt_recipm1_alphas_cumprod) * eps_hat
  mean = ex(tb.posterior_mean_coef1) * pred_x0 + ex(tb.posterior_mean_coef2) * x_t
  true_mean = ex(tb.posterior_mean_coef1) * x0 + ex(tb.posterior_mean_coef2) * x_t
  true_logvar = ex(tb.posterior_log_variance_clipped)
  kl = 0.5 * (-1.0 + logvar - true_logvar + th.exp(true_logvar - logvar)
              + (true_mean - mean) ** 2 * th.exp(-logvar))
  kl = kl.mean(dim=1) / np.log(2.0)

  def cdf(x):
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))

  log_scales = 0.5 * logvar
  centered = x0 - mean
  inv = th.exp(-log_scales)
  cdf_plus, cdf_min = cdf(inv * (centered + 1 / 255)), cdf(inv * (centered - 1 / 255))
  log_probs = th.where(
    x0 < -0.999, th.log(cdf_plus.clamp(min=1e-12)),
    th.where(x0 > 0.999, th.log((1 - cdf_min).clamp(min=1e-12)),
             th.log((cdf_plus - cdf_min).clamp(min=1e-12))))
  nll = -log_probs.mean(dim=1) / np.log(2.0)
  vb = th.where(th.from_numpy(t) == 0, nll, kl)
  mse = ((eps - eps_hat) ** 2).mean(dim=1)
  return {'loss': (mse + vb).numpy(), 'mse': mse.numpy(), 'vb': vb.numpy()}


def test_training_losses_match_official_formulas():
  rng = np.random.default_rng(0)
  n, c = 64, 4
  t = np.concatenate([[0, 0, 1, 2, 999, 998, 500], rng.integers(0, 1000, n - 7)])
  x_start = rng.uniform(-1.2, 1.2, (n, c)).astype(np.float32)
  x_start[:3, 0] = [-1.0, 1.0, 0.9995]  # the discretised-likelihood edge bins
  noise = rng.standard_normal((n, c)).astype(np.float32)
  eps_hat = (noise + 0.3 * rng.standard_normal((n, c))).astype(np.float32)
  v = rng.uniform(-1, 1, (n, c)).astype(np.float32)
  out = np.concatenate([eps_hat, v], axis=1)
  ref = _official_losses_torch(out, x_start, t, noise)
  got = losses.training_losses(jnp.asarray(out), jnp.asarray(x_start), jnp.asarray(t),
                               jnp.asarray(noise))
  for k in ('mse', 'vb', 'loss'):
    np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=2e-4, atol=2e-5, err_msg=k)
  assert np.all(np.asarray(got['vb'])[t == 0] > 0)


def test_vb_term_trains_only_the_variance():
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  out = jnp.asarray(rng.standard_normal((8, 8)) * 0.5, jnp.float32)
  t = jnp.arange(8) * 120
  g = jax.grad(lambda o: losses.training_losses(o, x0, t, noise)['vb'].sum())(out)
  assert np.all(np.asarray(g[:, :4]) == 0) and np.any(np.asarray(g[:, 4:]) != 0)
  g = jax.grad(lambda o: losses.training_losses(o, x0, t, noise)['mse'].sum())(out)
  assert np.all(np.asarray(g[:, 4:]) == 0)


def test_diffusion_loss_counts_masked_rows_only():
  rng = np.random.default_rng(2)
  target = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((32, 6)), jnp.float32)
  mask = jnp.asarray(rng.random(32) < 0.5, jnp.float32)
  net = lambda x, t, c: jnp.concatenate([x * 0.5 + c[:, :4], jnp.tanh(c[:, 2:6])], 1)  # noqa: E731
  key = jax.random.key(0)
  loss, _ = losses.diffusion_loss(net, target, z, mask, key)
  changed = target + 10.0 * (1 - mask)[:, None]  # only unmasked rows change
  loss2, _ = losses.diffusion_loss(net, changed, z, mask, key)
  assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
  loss3, _ = losses.diffusion_loss(net, target + 10.0 * mask[:, None], z, mask, key)
  assert abs(float(loss3) - float(loss)) > 1e-3


def test_masking_counts_and_visible_gather():
  seq, lo = 64, 0.7
  v = step.max_visible(seq, lo)
  assert v == seq - math.ceil(seq * lo) == 19
  for i in range(6):
    k1, k2 = jax.random.split(jax.random.key(i))
    orders = step.random_orders(k1, 3, seq)
    assert all(sorted(np.asarray(o)) == list(range(seq)) for o in orders)
    ratio = float(step.sample_mask_ratio(k2, lo))
    n = int(step.num_masked_tokens(ratio, seq))
    assert lo <= ratio <= 1.0 and n == math.ceil(seq * np.float32(ratio))
    mask = np.asarray(step.mask_from_orders(orders, n))
    assert (mask.sum(1) == n).all()
    for b in range(3):  # masked = the first n entries of the order
      assert set(np.flatnonzero(mask[b])) == set(np.asarray(orders[b, :n]))
    pos, valid = step.visible_positions(orders, n, v)
    pos, valid = np.asarray(pos), np.asarray(valid)
    assert (valid.sum(1) == seq - n).all()
    for b in range(3):
      assert set(pos[b][valid[b]]) == set(np.flatnonzero(mask[b] == 0))


def test_mask_ratio_is_the_official_truncated_normal():
  stats = pytest.importorskip('scipy.stats')
  r = np.asarray(jax.vmap(lambda k: step.sample_mask_ratio(k, 0.7))(
    jax.random.split(jax.random.key(0), 20000)))
  ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
  assert r.min() >= 0.7 and r.max() <= 1.0
  assert abs(r.mean() - ref.mean()) < 0.003 and abs(r.std() - ref.std()) < 0.003


def test_weight_decay_mask_matches_official_rule_on_module_tree():
  pytest.importorskip('torch')
  from flax import nnx

  from disa_jax.config import TINY_MODEL
  from disa_jax.convert.mapping import _flat_target, torch_key_to_flax
  from disa_jax.systems.mar.model import MAR, MARConfig
  from reference.mar import TorchMAR

  cfg = MARConfig.from_dict(TINY_MODEL)
  params = nnx.state(MAR(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  ours = {optim.path_name(p): bool(m) for p, m in
          jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  target = _flat_target(params)
  official = {}
  for name, p in TorchMAR(cfg).named_parameters():  # util/misc.py add_weight_decay
    no_decay = len(p.shape) == 1 or name.endswith('.bias') or 'diffloss' in name
    official[torch_key_to_flax(name, target)[0]] = not no_decay
  assert ours == official
  assert ours['fake_latent'] and ours['class_emb.embedding'] and ours['mask_token']
  assert not ours['diffloss.net.res_blocks.0.mlp.0.kernel'] and not ours['z_proj_ln.scale']


def test_optimizer_is_adamw_with_clip_and_official_lr():
  from disa_jax.config import train_config

  tc = train_config(batch_size=512, blr=1e-4, warmup_steps=10, num_steps=100, grad_clip=3.0)
  assert optim.learning_rate(tc, 512) == pytest.approx(2e-4)
  sched = optim.lr_schedule(tc, 512)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(1e-4)
  assert float(sched(50)) == pytest.approx(2e-4)
  tx = optim.make_optimizer(tc, 512)
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  grads = {'w': jnp.full((2, 2), 100.0), 'b': jnp.zeros((2,))}
  st = tx.init(params)
  for _ in range(20):
    upd, st = tx.update(grads, st, params)
  # With a zero gradient only weight decay moves a parameter; 'b' is 1-D -> no decay.
  assert np.all(np.asarray(upd['b']) == 0)


def test_last_t_fraction_adds_eps_only_rows_at_the_last_timestep():
  """`last_t_fraction` (the MNIST recipe's lever for the head's precision at t=999) moves about
  that fraction of rows to t = T-1, trains them on eps-MSE only, and at 0 is the official
  loss with the same random draws."""
  rng = np.random.default_rng(3)
  n = 4000
  target = jnp.asarray(rng.standard_normal((n, 4)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((n, 6)), jnp.float32)
  mask = jnp.ones(n)
  seen = {}

  def net(x, t, c):
    seen['t'] = t
    return jnp.concatenate([x * 0.9 + 0.1 * c[:, :4], jnp.tanh(c[:, 2:6])], 1)

  key = jax.random.key(7)
  losses.diffusion_loss(net, target, z, mask, key)
  t_official = np.asarray(seen['t']).astype(np.int32)
  mask = jnp.asarray(t_official != 999, jnp.float32)  # rows already at T-1 are ambiguous
  official, _ = losses.diffusion_loss(net, target, z, mask, key)
  same, _ = losses.diffusion_loss(net, target, z, mask, key, last_t_fraction=0.0)
  assert float(same) == float(official)
  loss, terms = losses.diffusion_loss(net, target, z, mask, key, last_t_fraction=0.3)
  t = np.asarray(seen['t']).astype(np.int32)
  moved = (t == 999) & (t_official != 999)
  assert abs(moved.mean() - 0.3) < 0.03
  assert np.array_equal(t[~moved], t_official[~moved])   # the other rows keep their draws
  # the moved rows' loss is their eps-MSE only (their VB at T-1 would be ~1e2)
  x_t = losses.q_sample(target, jnp.asarray(t), jax.random.normal(jax.random.split(key)[1],
                                                                   target.shape))
  per_row = losses.training_losses(net(x_t, jnp.asarray(t, jnp.float32), z), target,
                                   jnp.asarray(t), jax.random.normal(jax.random.split(key)[1],
                                                                     target.shape))
  assert float(jnp.max(per_row['vb'][moved])) > 10.0
  expected = (jnp.where(jnp.asarray(moved), per_row['mse'], per_row['loss']) * mask).sum() / mask.sum()
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
