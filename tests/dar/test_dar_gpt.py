"""D-AR GPT vs the PyTorch reference: logits with and without the KV cache, the CFG schedule,
and whole generated id sequences with every categorical draw injected (ids equal)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import dar_helpers as h  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from disa_jax.errors import UserError  # noqa: E402
from disa_jax.systems.dar import Sampler, SamplingOptions, cfg_schedule  # noqa: E402
from reference import dar as ref  # noqa: E402

TOL = 1e-5
L = h.TINY_GPT['block_size']


@pytest.fixture(scope='module')
def pair():
  tm, gm, _ = h.gpt_pair()
  return tm, gm, Sampler(gm, matmul_precision='highest')


def _torch_logits(tm, labels, ids):
  with torch.no_grad():
    return tm.full_logits(torch.from_numpy(labels), torch.from_numpy(ids)).numpy()


def test_logits_without_cache_match_reference(pair):
  tm, _, sampler = pair
  rng = np.random.default_rng(0)
  labels, ids = np.array([1, 4, 10]), rng.integers(0, 64, (3, L - 1))  # 10 = null class
  got = sampler.logits(labels, ids)
  want = _torch_logits(tm, labels, ids)
  assert h.max_rel_error(got, want) <= TOL
  assert want.std() > 0.3


def test_cached_prefill_and_steps_equal_full_forward(pair):
  tm, gm, sampler = pair
  rng = np.random.default_rng(1)
  labels, ids = np.array([2, 7]), rng.integers(0, 64, (2, L - 1))
  want = _torch_logits(tm, labels, ids)
  import jax
  with jax.default_matmul_precision('highest'):
    cache = gm.empty_cache(2)
    prefix = 5                            # class + 5 ids in one pass, then one id per step
    logits, cache = gm.forward(gm.embed(jnp.asarray(labels), jnp.asarray(ids[:, :prefix])), 0,
                               cache)
    got = [np.asarray(logits)]
    for j in range(prefix, L - 1):
      step, cache = gm.forward(gm.embed_tokens(jnp.asarray(ids[:, j:j + 1])), j + 1, cache)
      got.append(np.asarray(step))
  assert h.max_rel_error(np.concatenate(got, axis=1), want) <= TOL


def test_cfg_schedule_matches_torch_linspace():
  s, on = cfg_schedule('1.2,8.0', 256)
  assert on
  np.testing.assert_array_equal(s, torch.linspace(1.2, 8.0, 256).numpy())
  np.testing.assert_allclose(s[[0, 1, 31, 32, 255]], [1.2, 1.226667, 2.026667, 2.053333, 8.0],
                             atol=1e-6)
  s, on = cfg_schedule('1.0,4.0', 256)                # a = 1.0 is bumped to 1.001
  assert on and s[0] == np.float32(1.001)
  assert cfg_schedule('1.0', 16)[1] is False
  with pytest.raises(UserError):
    cfg_schedule('0.5,3.0', 16)


CASES = [
  SamplingOptions(),                                               # FID setting: CFG 1.2 -> 8
  SamplingOptions(cfg='4.0', temperature=0.9, top_k=10),           # demo CFG, top-k
  SamplingOptions(cfg='1.0', top_p=0.8),                           # no CFG, nucleus
  SamplingOptions(cfg='2.0,3.0', temperature=1.3, top_k=20, top_p=0.9),
]


@pytest.mark.parametrize('opts', CASES, ids=['fid', 'topk', 'topp', 'both'])
def test_generated_ids_equal_reference(pair, opts):
  tm, _, sampler = pair
  labels = np.array([0, 3, 9])
  u = np.random.default_rng(2).random((3, L)).astype(np.float32)
  got = sampler.generate(labels, uniforms=u, options=opts, decode=False).ids
  want = ref.generate(tm, torch.from_numpy(labels), torch.from_numpy(u), cfg=opts.cfg,
                      temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p).numpy()
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got)) > 8


def test_prefix_prefill_equals_reference_and_is_kept(pair):
  tm, _, sampler = pair
  labels = np.array([5, 6])
  u = np.random.default_rng(3).random((2, L)).astype(np.float32)
  prefix = np.random.default_rng(4).integers(0, 64, (8,))
  got = sampler.generate(labels, uniforms=u, prefix_ids=prefix, decode=False).ids
  want = ref.generate(tm, torch.from_numpy(labels), torch.from_numpy(u),
                      prefix=torch.from_numpy(np.stack([prefix, prefix]))).numpy()
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, :8], np.stack([prefix, prefix]))


def test_one_compile_per_setting_not_per_position(pair):
  _, gm, _ = pair
  sampler = Sampler(gm)
  for seed in range(2):
    sampler.generate(np.array([1, 2]), uniforms=np.random.default_rng(seed).random((2, L)),
                     decode=False)
  assert sampler.compiles == {'prefill': 1, 'step': 1}
  sampler.generate(np.array([1, 2]), prefix_ids=np.zeros(4, int), decode=False)
  assert sampler.compiles == {'prefill': 2, 'step': 1}


def test_key_driven_sampling_is_reproducible(pair):
  import jax
  _, _, sampler = pair
  a = sampler.generate([1, 2], key=jax.random.key(3), decode=False).ids
  b = sampler.generate([1, 2], key=jax.random.key(3), decode=False).ids
  c = sampler.generate([1, 2], key=jax.random.key(4), decode=False).ids
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_bad_arguments_raise_user_errors(pair):
  _, _, sampler = pair
  with pytest.raises(UserError, match='labels'):
    sampler.generate([10], decode=False)
  with pytest.raises(UserError, match='prefix'):
    sampler.generate([1], prefix_ids=np.zeros(L, int), decode=False)
  with pytest.raises(UserError, match='uniforms'):
    sampler.generate([1], uniforms=np.zeros((1, 3)), decode=False)
