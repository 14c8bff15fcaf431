"""The sampler's own randomness (issue 21, gap 1): the production path draws exactly the noise
its documented scheme prescribes, and those draws are independent across AR steps, denoising
steps, tokens and images.

Scheme (disa_jax/systems/mar/sampling.py): image i of a run with key k uses
k_i = fold_in(k, image_id[i]); its order is permutation(fold_in(k_i, 0), L); the token at
position p has row key r = fold_in(fold_in(k_i, 1), p), initial noise normal(fold_in(r, 0))
and the noise of denoising step j (0-based) normal(fold_in(r, j + 1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel_error, tiny_model

from disa_jax.schedules import resolve_steps
from disa_jax.systems.mar.sampling import Sampler

SPEC = resolve_steps(num_iter=5, preset='disa', upper=6, lower=2)


def _image_key(key, image_id):
  return jax.random.fold_in(key, np.uint32(image_id))


def scheme_orders(key, ids, seq_len):
  return np.stack([np.asarray(jax.random.permutation(
    jax.random.fold_in(_image_key(key, i), 0), seq_len)) for i in ids]).astype(np.int32)


def scheme_draws(key, image_id, position, num_steps, channels):
  """(x_T [C], eps [num_steps, C]) of one token under the documented scheme."""
  row = jax.random.fold_in(jax.random.fold_in(_image_key(key, image_id), 1), int(position))
  draw = lambda s: np.asarray(jax.random.normal(jax.random.fold_in(row, s), (channels,)))  # noqa
  return draw(0), np.stack([draw(j + 1) for j in range(num_steps)])


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=5)


@pytest.mark.parametrize('cfg,temperature', [(1.0, 1.0), (2.5, 0.7)])
def test_internal_randomness_is_the_documented_scheme(model, cfg, temperature):
  sampler = Sampler(model, enc_bucket=4)
  c = model.config
  labels = np.array([1, 4, 7])
  ids = np.array([5, 0, 11])                       # not 0..B-1: image ids select the streams
  key = jax.random.key(123)
  kw = dict(steps=SPEC.steps, max_timestep=SPEC.max_timestep, cfg=cfg, cfg_schedule='linear',
            temperature=temperature)
  got = sampler.generate(labels, key, image_ids=ids, **kw)
  orders = scheme_orders(key, ids, c.seq_len)
  plan = sampler.plan(len(labels), **{k: kw[k] for k in ('steps', 'max_timestep', 'cfg',
                                                         'cfg_schedule')})

  def noise(ar_step, n):
    s = plan.steps[ar_step]
    assert s.n_pred == n
    xs, es = [], []
    for b, image_id in enumerate(ids):
      pos = np.sort(orders[b, s.m_cur - n:s.m_cur])   # predicted rows, ascending position
      draws = [scheme_draws(key, image_id, p, s.actual_steps, c.token_embed_dim) for p in pos]
      xs.append(np.stack([d[0] for d in draws]))
      es.append(np.stack([d[1] for d in draws], axis=1))
    return np.stack(xs), np.stack(es, axis=1)          # [B, n, C], [A, B, n, C]

  want = sampler.generate(labels, key, image_ids=ids, orders=orders, noise=noise, **kw)
  assert max_rel_error(got, want) < 1e-6
  # A different key, or swapped image ids, gives different images (the ids are used).
  other = sampler.generate(labels, key, image_ids=ids[[1, 0, 2]], **kw)
  assert max_rel_error(other[2], got[2]) < 1e-6 and max_rel_error(other[0], got[0]) > 1e-2


def test_scheme_draws_are_independent_standard_normals():
  """Across denoising steps (x_T vs eps_0 vs eps_1 ...), tokens and images: correlations vanish
  and moments are standard normal, within 5 standard errors."""
  key = jax.random.key(9)
  steps, channels = 4, 16
  draws = jax.vmap(lambda i: jax.vmap(lambda p: jnp.concatenate([
    jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(key, i), 1), p), s), (channels,))[None] for s in range(steps + 1)]))(
      jnp.arange(64)))(jnp.arange(32, dtype=jnp.uint32))
  x = np.asarray(draws)                            # [images 32, tokens 64, streams 5, C]
  n = x.shape[0] * x.shape[1] * channels
  se = 1 / np.sqrt(n)
  assert abs(x.mean()) < 5 * se and abs(x.var() - 1) < 5 * np.sqrt(2) * se
  flat = x.transpose(2, 0, 1, 3).reshape(steps + 1, -1)
  corr = np.corrcoef(flat)                         # stream vs stream (x_T, eps_0, ...)
  assert np.abs(corr - np.eye(steps + 1)).max() < 5 * se
  tok = x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)            # neighbouring positions
  img = x[:-1].reshape(-1), x[1:].reshape(-1)                  # neighbouring images
  for a, b in (tok, img):
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
  vectors = x.reshape(-1, channels)
  assert len({v.tobytes() for v in vectors}) == len(vectors)   # no stream is reused


def test_default_image_ids_are_batch_positions(model):
  """Without image_ids, image b of the batch uses stream b (ids 0..B-1, documented default),
  so equal labels in one batch give different images, and image b equals a run that passes
  id b explicitly."""
  sampler = Sampler(model, enc_bucket=4)
  labels, key = np.array([3, 3, 3]), jax.random.key(4)
  kw = dict(steps=SPEC.steps, max_timestep=SPEC.max_timestep, cfg=1.0)
  default = np.asarray(sampler.generate(labels, key, **kw))
  explicit = np.asarray(sampler.generate(labels, key, image_ids=np.arange(3), **kw))
  np.testing.assert_array_equal(default, explicit)
  assert max_rel_error(default[0], default[1]) > 1e-2
  assert max_rel_error(default[1], default[2]) > 1e-2
