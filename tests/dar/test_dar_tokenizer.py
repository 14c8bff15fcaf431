"""D-AR tokenizer vs the PyTorch reference (reference/dar.py), tiny sizes, fp32, random non-zero
weights converted by the real converter; every noise draw injected."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import dar_helpers as h  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from disa_jax.errors import UserError  # noqa: E402
from disa_jax.systems.dar import TokenizerConfig, flow_grid  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope='module')
def pair():
  return h.tokenizer_pair()


def test_encoder_ids_match_reference(pair):
  ref, run, _ = pair
  x, xt = h.images(3, seed=1)
  ids = run.encode(x)
  with torch.no_grad():
    want = ref.encode(torch.from_numpy(xt)).numpy()
  np.testing.assert_array_equal(ids, want)
  assert len(np.unique(ids)) > 4          # not a degenerate codebook hit


def test_encoder_queries_are_causal(pair):
  """Query i never sees later queries: z of the first queries is unchanged when only the
  learned query vectors after them change (checked on the JAX model's latents)."""
  _, run, _ = pair
  from flax import nnx
  model = nnx.merge(run.graphdef, run.state)
  x, _ = h.images(2, seed=2)
  z1 = np.asarray(model.encode_latents(jnp.asarray(x)))
  table = model.query_embedding[...]
  model.query_embedding[...] = table.at[8:].add(1.0)
  z2 = np.asarray(model.encode_latents(jnp.asarray(x)))
  np.testing.assert_array_equal(z1[:, :8], z2[:, :8])
  assert np.abs(z1[:, 8:] - z2[:, 8:]).max() > 1e-3


def test_token_decoder_conditions_match_reference(pair):
  ref, run, _ = pair
  ids = np.random.default_rng(3).integers(0, 64, (2, 16))
  got = np.asarray(run.conditions(ids))
  with torch.no_grad():
    want = ref.conditions(torch.from_numpy(ids)).numpy()
  assert h.max_rel_error(got, want) <= TOL
  ids2 = ids.copy()
  ids2[:, 8:] = (ids2[:, 8:] + 1) % 64          # later ids do not move earlier rows
  got2 = np.asarray(run.conditions(ids2))
  np.testing.assert_allclose(got2[:, :8], got[:, :8], rtol=0, atol=1e-6)
  assert np.abs(got2[:, 8:] - got[:, 8:]).max() > 1e-3


@pytest.mark.parametrize('step', [0, 2])
def test_one_flow_step_matches_reference(pair, step):
  ref, run, _ = pair
  grid = flow_grid(run.cfg)
  x, xt = h.noise(2, seed=4)
  cond = np.random.default_rng(5).standard_normal((2, 4, 64)).astype(np.float32)
  t = grid.times[step]
  v_prev = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
  x_new, v, preview = run._step(run.state, jnp.asarray(x), jnp.asarray(v_prev),
                                jnp.asarray(cond), grid.times[step], grid.steps[step],
                                step == 0)
  with torch.no_grad():
    want_v = ref.velocity(torch.from_numpy(xt), torch.full((2,), float(t)),
                          torch.from_numpy(cond)).numpy().transpose(0, 2, 3, 1)
  assert h.max_rel_error(v, want_v) <= TOL
  assert np.abs(want_v).max() > 0.1
  d = want_v if step == 0 else 1.5 * want_v - 0.5 * v_prev
  assert h.max_rel_error(x_new, x + grid.steps[step] * d) <= TOL
  assert h.max_rel_error(preview, (x + (1 - t) * d) / 0.6) <= TOL


@pytest.mark.parametrize('num_steps,clip', [(None, None), (None, 1), (None, 3), (2, None)])
def test_decode_matches_reference(pair, num_steps, clip):
  ref, run, _ = pair
  ids = np.random.default_rng(7).integers(0, 64, (2, 16))
  x, xt = h.noise(2, seed=8)
  got = run.decode(ids, x, num_steps=num_steps, clip_steps=clip)
  with torch.no_grad():
    want = ref.decode_code(torch.from_numpy(ids), torch.from_numpy(xt), clip_steps=clip,
                           num_steps=num_steps).numpy().transpose(0, 2, 3, 1)
  assert h.max_rel_error(got, want) <= TOL
  assert np.abs(want).max() > 0.5


def test_official_grid_golden_values():
  grid = flow_grid(TokenizerConfig())
  i = np.arange(9)
  np.testing.assert_allclose(grid.times, i / (16 - i), rtol=1e-6)
  np.testing.assert_allclose(grid.steps[[0, 3, 7]], [0.0666666701, 0.102564111, 0.222222209],
                             rtol=1e-7)
  assert grid.group_start == tuple(range(0, 256, 32))
  assert flow_grid(TokenizerConfig(), num_steps=4).group_start == (0, 64, 128, 192)
  clipped = flow_grid(TokenizerConfig(), clip_steps=3)
  np.testing.assert_allclose(clipped.times, [0, 1 / 15, 1 / 7, 1], rtol=1e-6)


def test_bad_inputs_raise_user_errors(pair):
  _, run, _ = pair
  with pytest.raises(UserError, match='shape'):
    run.encode(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(UserError, match='exactly|shape'):
    run.decode(np.zeros((1, 8), np.int32), np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(UserError, match='lie in'):
    run.decode(np.full((1, 16), 64), np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(UserError, match='clip_steps'):
    run.decode(np.zeros((1, 16), np.int32), np.zeros((1, 64, 64, 3), np.float32), clip_steps=0)
