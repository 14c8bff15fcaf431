"""Speculative decoding of D-AR ids (disa_jax/systems/dar/speculative.py): exactness with a
draft equal to the target, batch independence, and the target's distribution kept with a
different draft (checked against the exact distribution from teacher-forced logits)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.gpt import GPT, GPTConfig
from disa_jax.systems.dar.sampling import Sampler, SamplingOptions
from disa_jax.systems.dar.speculative import SpeculativeSampler, verify

SMALL = dict(dim=64, n_layer=1, n_head=1, vocab_size=16, block_size=8, num_classes=4)
TINY = dict(dim=128, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)


def gpt(seed: int, sharpen: float = 1.0, **cfg) -> Sampler:
  """A random GPT; `sharpen` scales the output layer so the distributions are peaked."""
  model = GPT(GPTConfig(**cfg), rngs=nnx.Rngs(seed))
  model.output.kernel[...] = model.output.kernel[...] * sharpen
  return Sampler(model, matmul_precision='highest')


def uniforms(b: int, L: int, seed: int):
  return [np.asarray(jax.random.uniform(k, (b, L)))
          for k in jax.random.split(jax.random.key(seed), 3)]


@pytest.mark.parametrize('cfg', ['4.0', '1.0'])
def test_draft_equal_to_target_reproduces_the_plain_loop(cfg):
  target = gpt(0, 20.0, **TINY)
  opts = SamplingOptions(cfg=cfg)
  u, a, r = uniforms(4, 16, 1)
  labels = np.array([1, 2, 3, 9])
  plain = target.generate(labels, options=opts, uniforms=u, decode=False).ids
  spec = SpeculativeSampler(target, target, draft_tokens=3, start=5)
  gen = spec.generate(labels, options=opts, uniforms=u, accept_uniforms=a, resid_uniforms=r,
                      decode=False)
  np.testing.assert_array_equal(gen.ids, plain)
  s = gen.speculation
  assert s['acceptance'] == 1.0 and sum(s['decided']) == 4 * (16 - 5)
  assert s['target_passes'] == -(-(16 - 5) // 3)          # every round advances K ids
  assert s['ids_per_row_pass'] == pytest.approx(11 / 4)
  assert dict(spec.compiles) == {'draft_prefill': 1, 'draft_round': 1, 'verify': 1}
  spec.generate(labels, options=opts, uniforms=u, decode=False)
  assert dict(spec.compiles) == {'draft_prefill': 1, 'draft_round': 1, 'verify': 1}


def test_ids_do_not_depend_on_the_batch_or_the_advance_rule():
  """A row's ids depend only on its own draws: a batch of 8 equals two batches of 4 and eight
  of 1, and the ragged rounds (each row to its own first rejection, every row at its own
  positions) equal rounds that stop the whole batch at its first rejection, in fewer passes."""
  target, draft = gpt(0, 8.0, **TINY), gpt(0, 5.0, **TINY)   # a flatter copy: often accepted
  spec = SpeculativeSampler(target, draft, draft_tokens=4, start=3)
  labels = np.arange(8) % 10
  u, a, r = uniforms(8, 16, 2)
  opts = SamplingOptions(cfg='1.5,4.0')
  whole = spec.generate(labels, options=opts, uniforms=u, accept_uniforms=a,
                        resid_uniforms=r, decode=False)
  assert 0.0 < whole.speculation['acceptance'] < 1.0
  for size in (4, 1):
    parts = [spec.generate(labels[i:i + size], options=opts, uniforms=u[i:i + size],
                           accept_uniforms=a[i:i + size], resid_uniforms=r[i:i + size],
                           decode=False).ids for i in range(0, 8, size)]
    np.testing.assert_array_equal(np.concatenate(parts), whole.ids)
  lockstep = SpeculativeSampler(target, draft, draft_tokens=4, start=3, ragged=False)
  same = lockstep.generate(labels, options=opts, uniforms=u, accept_uniforms=a,
                           resid_uniforms=r, decode=False)
  np.testing.assert_array_equal(same.ids, whole.ids)
  assert same.speculation['acceptance'] == whole.speculation['acceptance']
  assert whole.speculation['target_passes'] < same.speculation['target_passes']


def _exact_joint(sampler: Sampler, label: int, prefix, opts) -> np.ndarray:
  """P(t5, t6, t7 | class, prefix of 5 ids) (V, V, V) from teacher-forced logits with CFG."""
  from disa_jax.systems.dar.sampling import cfg_schedule

  v = sampler.gpt_cfg.vocab_size
  scales, _ = cfg_schedule(opts.cfg, sampler.gpt_cfg.block_size)
  seqs = np.array([list(prefix) + [a, b] for a, b in itertools.product(range(v), repeat=2)])
  n = len(seqs)
  cond = sampler.logits(np.full(n, label), seqs)
  null = sampler.logits(np.full(n, sampler.gpt_cfg.num_classes), seqs)
  guided = null + (cond - null) * scales[None, :cond.shape[1], None]
  p = np.asarray(jax.nn.softmax(jnp.asarray(guided), axis=-1), np.float64)
  p5 = p[0, 5]                                   # row i predicts id i
  p6 = p[::v, 6]                                 # (V: t5, V: t6)
  p7 = p[:, 7].reshape(v, v, v)                  # (t5, t6, t7)
  return p5[:, None, None] * p6[:, :, None] * p7


def _tv(counts: np.ndarray, probs: np.ndarray) -> float:
  return 0.5 * float(np.abs(counts / counts.sum() - probs).sum())


def test_speculative_ids_follow_the_target_distribution():
  target, draft = gpt(0, 12.0, **SMALL), gpt(5, 12.0, **SMALL)
  opts = SamplingOptions(cfg='2.0')
  prefix = [3, 1, 4, 1, 5]
  label, b, reps = 2, 2048, 4
  exact = _exact_joint(target, label, prefix, opts)
  draft_exact = _exact_joint(draft, label, prefix, opts)
  spec = SpeculativeSampler(target, draft, draft_tokens=2, start=6)
  got, plain = [], []
  for rep in range(reps):
    key = jax.random.key(100 + rep)
    got.append(spec.generate(np.full(b, label), key=key, options=opts, prefix_ids=prefix,
                             decode=False).ids[:, 5:8])
    plain.append(target.generate(np.full(b, label), key=key, options=opts, prefix_ids=prefix,
                                 decode=False).ids[:, 5:8])
  v = SMALL['vocab_size']

  def pair_counts(ids):                          # (t6, t7) joint: 256 cells
    return np.bincount(ids[:, 1] * v + ids[:, 2], minlength=v * v).astype(np.float64)

  spec_ids, plain_ids = np.concatenate(got), np.concatenate(plain)
  want = exact.sum(0).reshape(-1)
  tv_spec, tv_plain = _tv(pair_counts(spec_ids), want), _tv(pair_counts(plain_ids), want)
  tv_draft = 0.5 * np.abs(draft_exact.sum(0).reshape(-1) - want).sum()
  # sampling noise of 8192 draws over 256 cells is ~0.05; the draft is far from the target
  assert tv_spec < max(1.5 * tv_plain, 0.06), (tv_spec, tv_plain)
  assert tv_draft > 4 * tv_spec, (tv_draft, tv_spec)
  # t6 alone (16 cells, tighter)
  t6 = np.bincount(spec_ids[:, 1], minlength=v).astype(np.float64)
  assert _tv(t6, exact.sum((0, 2))) < 0.03


def test_verify_keeps_drafts_until_the_first_rejection():
  p = jnp.asarray([[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])     # (1, 3, 3)
  q = jnp.asarray([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
  drafts = jnp.asarray([[1, 0, 2]])
  ids, accepted, advance = verify(p, q, drafts, jnp.full((1, 3), 0.3), jnp.full((1, 3), 0.5))
  assert accepted.tolist() == [[True, False, False]]
  assert ids.tolist() == [[1, 1, 0]]            # residual draws: the mass p has beyond q
  assert advance.tolist() == [2]                # the row's first rejection + 1


def test_bad_settings_are_one_line_errors():
  target = gpt(0, **TINY)
  with pytest.raises(UserError, match='does not match the target'):
    SpeculativeSampler(target, gpt(1, **SMALL))
  with pytest.raises(UserError, match='draft_tokens'):
    SpeculativeSampler(target, target, draft_tokens=0)
  with pytest.raises(UserError, match='speculation start'):
    SpeculativeSampler(target, target, start=16)
  spec = SpeculativeSampler(target, target)
  with pytest.raises(UserError, match='accept_uniforms must have shape'):
    spec.generate([1], accept_uniforms=np.zeros((1, 3)), decode=False)


def test_cost_model_bench_smoke():
  from disa_jax.systems.dar.spec_bench import ids_per_round, run

  assert ids_per_round(1.0, 4, 4) == 4 and ids_per_round(0.0, 4, 4) == 1
  assert ids_per_round(0.9, 2, 4) == pytest.approx(1 + 0.9 ** 4)
  res = run(small=True, ks=(2,), drafts=('toy',), repeats=1, batch=2)
  assert res['t_step'] > 0 and res['t_verify'][2]['warm'] > 0
  assert res['t_draft']['toy'][2]['warm'] > 0
  pred = res['predicted_speedup']['ragged']['toy'][2]
  lock = res['predicted_speedup']['lockstep']['toy'][2]
  assert pred['1.0'] > pred['0.5'] > 0 and pred['0.9'] > lock['0.9']
  assert pred['1.0'] == lock['1.0']
