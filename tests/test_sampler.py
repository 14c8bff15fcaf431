"""Sampler semantics on small configs, parity with the PyTorch reference, compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
  PARITY_WEIGHT_SCALE,
  TOKEN_PARITY_CASES,
  TOKEN_PARITY_TOL,
  max_rel_error,
  tiny_model,
  token_parity,
)

import disa_jax
from disa_jax.diffusion.ddpm import MODULATION_BUDGET_BYTES
from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.heads.mlp_adaln import SimpleMLPAdaLN
from disa_jax.schedules import resolve_steps
from disa_jax.systems.mar.sampling import Sampler


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=3)


@pytest.fixture(scope='module')
def sampler(model):
  return Sampler(model, enc_bucket=4)


DISA = resolve_steps(num_iter=6, preset='disa', upper=8, lower=3)


def _manual_head(net, z, key, num_steps, cfg, temperature, max_timestep):
  """The official p_sample_loop written out with net.forward_with_cfg (reference algebra)."""
  sched = spaced_schedule(num_steps, max_timestep)
  tb = sched.tables
  n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
  keys = jax.random.split(key, n)
  draw = lambda s: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), (16,)))(keys)  # noqa
  x = draw(0)
  if cfg != 1.0:
    x = jnp.concatenate([x, x])
  for i, k in enumerate(reversed(range(sched.num_steps))):
    t = jnp.full((x.shape[0],), sched.timesteps[k])
    out = net.forward_with_cfg(x, t, z, cfg) if cfg != 1.0 else net(x, t, z)
    eps, v = out[:, :16], out[:, 16:]
    frac = (v + 1) / 2
    logvar = frac * np.log(tb.betas[k]) + (1 - frac) * tb.posterior_log_variance_clipped[k]
    x0 = tb.sqrt_recip_alphas_cumprod[k] * x - tb.sqrt_recipm1_alphas_cumprod[k] * eps
    mean = tb.posterior_mean_coef1[k] * x0 + tb.posterior_mean_coef2[k] * x
    noise = draw(i + 1)
    if cfg != 1.0:
      noise = jnp.concatenate([noise, draw(i + 1) * 0 + 7.0])   # uncond half: never used
    x = mean + (k != 0) * jnp.exp(0.5 * logvar) * temperature * noise
  return x[:n]


# Head paths: the default budget precomputes every step's adaLN modulations (tiny models
# always fit); a budget of 0 forces the per-step path that MAR-B takes at batch 256.
HEAD_PATHS = pytest.mark.parametrize('budget', [MODULATION_BUDGET_BYTES, 0],
                                     ids=['precomputed', 'per_step'])


@HEAD_PATHS
@pytest.mark.parametrize('cfg,max_t', [(1.0, None), (3.0, 950), (2.0, None)])
def test_sample_head_matches_official_algebra(model, cfg, max_t, budget):
  rng = np.random.default_rng(0)
  n = 5
  z = jnp.asarray(rng.standard_normal((2 * n if cfg != 1.0 else n, 64)), jnp.float32)
  key = jax.random.key(7)
  got = disa_jax.sample_head(model, z, key, num_steps=6, temperature=0.8, cfg=cfg,
                             max_timestep=max_t, modulation_budget=budget)
  want = _manual_head(model.diffloss.net, z, key, 6, cfg, 0.8, max_t)
  assert got.shape == (n, 16)
  assert max_rel_error(got, want) < 1e-5


def test_temperature_scales_only_step_noise(model):
  z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)), jnp.float32)
  key = jax.random.key(0)
  # One respaced step: k = 0 only, where no noise is added: temperature cannot matter, and
  # x_T itself is not scaled by the temperature.
  a = disa_jax.sample_head(model, z, key, num_steps=1, temperature=1.0)
  b = disa_jax.sample_head(model, z, key, num_steps=1, temperature=0.01)
  np.testing.assert_array_equal(a, b)
  c = disa_jax.sample_head(model, z, key, num_steps=5, temperature=1.0)
  d = disa_jax.sample_head(model, z, key, num_steps=5, temperature=0.5)
  assert float(jnp.abs(c - d).max()) > 1e-3


def test_every_position_sampled_once_and_deterministic(sampler):
  labels = np.array([0, 1, 2, 3])
  key = jax.random.key(0)
  seen = []
  noise = lambda step, n: (seen.append(n) or (  # noqa: E731
    np.ones((4, n, 16), np.float32), np.zeros((sampler.plan(
      4, steps=DISA.steps, max_timestep=950, cfg=2.0).steps[step].actual_steps, 4, n, 16))))
  sampler.generate(labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0, noise=noise)
  plan = sampler.plan(4, steps=DISA.steps, max_timestep=950, cfg=2.0)
  assert seen == [s.n_pred for s in plan.steps] and sum(seen) == 16
  t1 = sampler.generate(labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0)
  t2 = sampler.generate(labels, key, steps=DISA.steps, max_timestep=950, cfg=2.0)
  np.testing.assert_array_equal(t1, t2)
  assert (np.abs(np.asarray(t1)).sum(-1) > 0).all()        # every position was written
  t3 = sampler.generate(labels, jax.random.key(1), steps=DISA.steps, max_timestep=950, cfg=2.0)
  assert float(jnp.abs(t1 - t3).max()) > 1e-2


def test_image_independent_of_batch(sampler):
  key = jax.random.key(5)
  full = sampler.generate(np.array([4, 5, 6, 7]), key, steps=DISA.steps, max_timestep=950,
                          cfg=2.0)
  part = sampler.generate(np.array([6, 7]), key, steps=DISA.steps, max_timestep=950, cfg=2.0,
                          image_ids=[2, 3])
  # Same noise and order; only float summation order may differ with the batch shape.
  assert max_rel_error(part, full[2:]) < 1e-5


def test_compiles_once_per_bucket():
  m = tiny_model(diffloss_w=96)
  s = Sampler(m, enc_bucket=4)
  plan = s.plan(2, steps=DISA.steps, max_timestep=950, cfg=2.0)
  s.generate(np.array([1, 2]), jax.random.key(0), steps=DISA.steps, max_timestep=950, cfg=2.0)
  want = {'init': 1, 'backbone': len(plan.backbone_buckets), 'head': len(plan.head_buckets)}
  assert dict(s.trace_counts) == want and s.last_stats.compiles == want
  assert len(s.compile_log) == 1 + len(plan.backbone_buckets) + len(plan.head_buckets)
  s.generate(np.array([3, 4]), jax.random.key(1), steps=DISA.steps, max_timestep=950, cfg=2.0)
  assert dict(s.trace_counts) == want
  assert s.last_stats.compiles == {'init': 0, 'backbone': 0, 'head': 0}
  assert s.last_stats.compile_s == 0.0
  # A second sampler of the same model keeps its own counts (no module-level counter).
  assert Sampler(m, enc_bucket=4).trace_counts == {}


def test_generate_function_api(model):
  toks = disa_jax.generate(model, np.array([1, -1]), jax.random.key(0), num_iter=4, cfg=1.5,
                           cfg_schedule='constant', temperature=1.0,
                           steps=disa_jax.step_schedule('cosine', 4, 6, 3), max_timestep=950)
  assert toks.shape == (2, 16, 16) and np.isfinite(np.asarray(toks)).all()


def test_bad_batch_for_mesh(model):
  from disa_jax.sharding import make_mesh

  s = Sampler(model, mesh=make_mesh(8))
  with pytest.raises(ValueError, match='multiple of the 8'):
    s.generate(np.arange(4), jax.random.key(0), steps=[3, 3], cfg=1.0)


def test_sharded_8_devices_equal_single(model):
  from disa_jax.sharding import make_mesh

  assert jax.device_count() == 8
  labels = np.arange(8) % 10
  key = jax.random.key(11)
  kw = dict(steps=DISA.steps, max_timestep=950, cfg=2.0)
  single = Sampler(model, enc_bucket=4).generate(labels, key, **kw)
  multi_sampler = Sampler(model, mesh=make_mesh(8), enc_bucket=4)
  multi = multi_sampler.generate(labels, key, **kw)
  assert multi.sharding.spec[0] == 'data'
  assert len(multi.sharding.device_set) == 8
  assert max_rel_error(multi, single) < 1e-5


# Every parity case through the precomputed head path; the per-step path on the DiSA + CFG
# case (the per-step path is also pinned by tests/test_official_golden.py for every case).
PARITY_RUNS = [(*c, MODULATION_BUDGET_BYTES) for c in TOKEN_PARITY_CASES] + [
  (*TOKEN_PARITY_CASES[0], 0)]


@pytest.mark.parametrize('preset,k,cfg,schedule,temp,budget', PARITY_RUNS,
                         ids=lambda v: 'per_step' if v == 0 else 'precomputed'
                         if v == MODULATION_BUDGET_BYTES else None)
def test_token_parity_with_torch_reference(preset, k, cfg, schedule, temp, budget):
  """From an in-memory state dict (tests/test_convert.py repeats this through the converter).
  Weights at PARITY_WEIGHT_SCALE (tests/test_parity_margins.py: approximations fail by > 10x)."""
  pytest.importorskip('torch')
  from disa_jax.convert.mapping import convert_state_dict
  from disa_jax.systems.mar.model import MAR
  from reference import mar as tr

  model_cfg = tiny_model().config
  tm = tr.randomize_(tr.TorchMAR(model_cfg).eval(), seed=4, scale=PARITY_WEIGHT_SCALE)
  sd = {n: p.detach().numpy() for n, p in tm.state_dict().items()}
  gd, abstract = nnx.split(nnx.eval_shape(lambda: MAR(model_cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(gd, convert_state_dict(sd, abstract))
  rel = token_parity(model, tm, preset=preset, k=k, cfg=cfg, schedule=schedule, temp=temp,
                     modulation_budget=budget)
  assert rel < TOKEN_PARITY_TOL, f'max relative error {rel:.2e}'


@pytest.mark.parametrize('cfg', [1.0, 2.0])
def test_budget_selects_head_path(model, monkeypatch, cfg):
  """Budget 0 really traces the per-step trunk; the default never does; same tokens."""
  calls = []
  real = SimpleMLPAdaLN.trunk
  monkeypatch.setattr(SimpleMLPAdaLN, 'trunk', lambda self, x, y: calls.append(1) or real(
    self, x, y))
  out = {}
  for budget in (MODULATION_BUDGET_BYTES, 0):
    calls.clear()
    s = Sampler(model, enc_bucket=4, modulation_budget=budget)
    out[budget] = s.generate(np.array([1, 2]), jax.random.key(3), steps=DISA.steps,
                             max_timestep=950, cfg=cfg)
    assert (len(calls) > 0) == (budget == 0), (budget, len(calls))
  assert max_rel_error(out[0], out[MODULATION_BUDGET_BYTES]) < 1e-5
  assert float(jnp.abs(out[0]).max()) > 0.1


@pytest.mark.parametrize('cfg', [1.0, 2.5])
def test_unconditional_token_parity_with_torch_reference(cfg):
  """Label -1 against the official unconditional call (`labels=None`: fake_latent for every
  image), values compared, not just shapes."""
  pytest.importorskip('torch')
  from disa_jax.convert.mapping import convert_state_dict
  from disa_jax.systems.mar.model import MAR
  from reference import mar as tr

  model_cfg = tiny_model().config
  tm = tr.randomize_(tr.TorchMAR(model_cfg).eval(), seed=5, scale=PARITY_WEIGHT_SCALE)
  sd = {n: p.detach().numpy() for n, p in tm.state_dict().items()}
  gd, abstract = nnx.split(nnx.eval_shape(lambda: MAR(model_cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(gd, convert_state_dict(sd, abstract))
  rel = token_parity(model, tm, preset='disa', k=6, cfg=cfg, schedule='linear', temp=1.0,
                     unconditional=True)
  assert rel < TOKEN_PARITY_TOL, f'max relative error {rel:.2e}'
