"""LazyMAR feature caching (disa_jax/systems/mar/lazy.py) against the uncached sampler and a
float64 NumPy re-implementation of the LazyMAR rule written in the official style (compacted
sequences, encoder K/V appended in order, kept rows in position order, masked scatter)."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import randomize
from scipy.special import erf

from disa_jax.config import TINY_MODEL
from disa_jax.errors import UserError
from disa_jax.systems.mar.lazy import RETAIN_RATIOS_64, parse_cache
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.systems.mar.plan import mask_schedule
from disa_jax.systems.mar.sampling import Sampler

STEPS = [6, 5, 5, 4, 4, 3, 3, 3]
LAZY = 'lazymar:start=2,interval=3,layer=2,margin=1,keep_bucket=1'


@pytest.fixture(scope='module')
def model():
  cfg = MARConfig.from_dict(dict(TINY_MODEL, encoder_depth=3, decoder_depth=5))
  m = MAR(cfg, rngs=nnx.Rngs(7))
  randomize(m, 7, scale=0.2)   # large enough that stale features change z visibly
  randomize(m.diffloss, 8, scale=0.02)   # a head that keeps tokens finite under CFG
  return m


_SAMPLERS = {}


def _run(model, cache, cfg, orders, labels):
  # one sampler per model: its executables serve every cache setting (compiled once)
  if id(model) not in _SAMPLERS:
    _SAMPLERS[id(model)] = Sampler(model, enc_bucket=4, matmul_precision='highest')
  sampler = _SAMPLERS[id(model)]
  rec = []
  tokens = sampler.generate(
    labels, jax.random.key(0), steps=STEPS, cfg=cfg, orders=orders, cache=cache,
    on_backbone=lambda s, z, p, v: rec.append((np.asarray(z), np.asarray(p))))
  return np.asarray(tokens), rec, sampler


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_parse_cache():
  assert parse_cache('') is None and parse_cache('none') is None
  c = parse_cache('lazymar:interval=4,ratio_scale=0.5')
  assert c.interval == 4 and c.ratio_scale == 0.5 and c.start is None and c.head is None
  assert parse_cache('lazymar:head=0').head == 0
  # the default head threshold: LazyMAR's 7 per 100 steps, scaled to the chain
  assert [c.head_threshold(a) for a in (100, 50, 30, 21, 5)] == [7, 4, 2, 1, 1]
  assert parse_cache('lazymar:head=7').head_threshold(5) == 7
  for bad in ('lazy', 'lazymar:foo=1', 'lazymar:interval=0', 'lazymar:start=x',
              'lazymar:ratio_scale=-1', 'lazymar:interval', 'lazymar:head=-1'):
    with pytest.raises(UserError, match='cache'):
      parse_cache(bad)


@pytest.mark.parametrize('cfg', [pytest.param(1.0, marks=pytest.mark.slow), 2.5])
def test_refresh_every_step_equals_uncached(model, cfg):
  orders = np.stack([np.random.default_rng(i).permutation(16) for i in range(3)])
  labels = np.array([1, 2, 3])
  t0, z0, _ = _run(model, None, cfg, orders, labels)
  # head=1: the head cache refreshes at every denoising step, i.e. is off
  t1, z1, s1 = _run(model, 'lazymar:interval=1,head=1', cfg, orders, labels)
  assert s1.last_stats.compiles['backbone'] == 0 and s1.last_stats.compiles['lazy_step'] == 0
  for (a, pa), (b, pb) in zip(z0, z1, strict=True):
    np.testing.assert_array_equal(pa, pb)
    assert _rel(b, a) < 1e-5
  assert _rel(t1, t0) < 1e-5
  # the head cache (numerics in test_head_cache.py) reaches the sampler's head executables
  # (threshold 1 runs the uncached executable: same numbers)
  _run(model, 'lazymar:interval=1,head=7', cfg, orders, labels)
  heads = [dict(key[2]) for key in s1._executables if key[0] == 'head']
  assert {h['head_cache'] for h in heads} == {0, 7}


# ------------------------------------------------------------------------------------------
# NumPy reference of the LazyMAR rule (official layout, float64)


def _params(model):
  return {'.'.join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _ln(w, name, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * w[name + '.scale'] + w[name + '.bias']


def _lin(w, name, x):
  return x @ w[name + '.kernel'] + w[name + '.bias']


def _qkv(w, pre, x, heads):
  y = _lin(w, pre + '.attn.qkv', _ln(w, pre + '.norm1', x))
  n, d = x.shape
  y = y.reshape(n, 3, heads, d // heads)
  return y[:, 0], y[:, 1], y[:, 2]   # [n, H, d]


def _attend(w, pre, x, q, k, v):
  s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum('hqk,khd->qhd', p, v).reshape(x.shape)
  return x + _lin(w, pre + '.attn.proj', o)


def _mlp(w, pre, x):
  h = _lin(w, pre + '.mlp.fc1', _ln(w, pre + '.norm2', x))
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return x + _lin(w, pre + '.mlp.fc2', h)


class LazyReference:
  """One image's LazyMAR backbone with CFG (cond branch cached), official semantics."""

  def __init__(self, w, c, label, *, start, interval, layer, margin, keep_bucket, num_iter):
    self.w, self.c = w, c
    self.cond_vec = w['class_emb.embedding'][label]
    self.fake = w['fake_latent'][0]
    self.start, self.interval, self.layer = start, interval, layer
    self.margin, self.keep_bucket, self.num_iter = margin, keep_bucket, num_iter
    self.nb, self.seq = c.buffer_size, c.seq_len

  def _enc_input(self, tokens, vec):
    w, nb = self.w, self.nb
    x = np.concatenate([np.broadcast_to(vec, (nb, len(vec))), _lin(w, 'z_proj', tokens)])
    return _ln(w, 'z_proj_ln', x + w['encoder_pos_embed_learned'][0])

  def _full(self, tokens, mask, vec, store):
    w, c, nb = self.w, self.c, self.nb
    keep = np.concatenate([np.ones(nb, bool), ~mask])
    x = self._enc_input(tokens, vec)[keep]
    slots = np.nonzero(keep)[0]
    for i in range(c.encoder_depth):
      pre = f'encoder_blocks.{i}'
      q, k, v = _qkv(w, pre, x, c.encoder_num_heads)
      if store:
        self.enc[i] = (list(slots), k.copy(), v.copy())
      x = _mlp(w, pre, _attend(w, pre, x, q, k, v))
    x = _lin(w, 'decoder_embed', _ln(w, 'encoder_norm', x))
    h = np.broadcast_to(w['mask_token'][0], (nb + self.seq, x.shape[1])).copy()
    h[keep] = x
    h = h + w['decoder_pos_embed_learned'][0]
    if store:
      self.dec_in = h.copy()
    for i in range(c.decoder_depth):
      pre = f'decoder_blocks.{i}'
      q, k, v = _qkv(w, pre, h, c.decoder_num_heads)
      if store:
        self.dec_k[i], self.dec_v[i] = k.copy(), v.copy()
      h = _mlp(w, pre, _attend(w, pre, h, q, k, v))
    return h

  def _lazy(self, step, tokens, mask, prev_pred, pred):
    w, c, nb, n_all = self.w, self.c, self.nb, self.nb + self.seq
    upd = np.concatenate([np.ones(nb, bool), prev_pred])     # buffer + newly visible
    x = self._enc_input(tokens, self.cond_vec)[upd]
    for i in range(c.encoder_depth):
      pre = f'encoder_blocks.{i}'
      q, k, v = _qkv(w, pre, x, c.encoder_num_heads)
      slots, ck, cv = self.enc[i]
      ck, cv = ck.copy(), cv.copy()
      ck[:nb], cv[:nb] = k[:nb], v[:nb]                        # buffer overwritten
      ck = np.concatenate([ck, k[nb:]])                        # new tokens appended
      cv = np.concatenate([cv, v[nb:]])
      self.enc[i] = (slots + list(np.nonzero(upd)[0][nb:]), ck, cv)
      x = _mlp(w, pre, _attend(w, pre, x, q, ck, cv))
    x = _lin(w, 'decoder_embed', _ln(w, 'encoder_norm', x))
    self.dec_in[upd] = x + w['decoder_pos_embed_learned'][0][upd]
    h = self.dec_in.copy()
    for i in range(self.layer):
      pre = f'decoder_blocks.{i}'
      q, k, v = _qkv(w, pre, h, c.decoder_num_heads)
      self.dec_k[i], self.dec_v[i] = k, v
      h = _mlp(w, pre, _attend(w, pre, h, q, k, v))
    pre = f'decoder_blocks.{self.layer}'
    q, k, v = _qkv(w, pre, h, c.decoder_num_heads)
    pv = self.dec_v[self.layer]
    cos = (v * pv).sum(-1) / np.maximum(np.linalg.norm(v, axis=-1) * np.linalg.norm(pv, axis=-1),
                                        1e-8)
    score = cos.mean(-1)
    score[nb:][pred] = 0
    score[nb:][prev_pred] = 0
    ratio = RETAIN_RATIOS_64[step * 64 // self.num_iter]
    fresh = max(int(pred.sum() + prev_pred.sum()) + self.margin, int(n_all * ratio))
    fresh = min(-(-fresh // self.keep_bucket) * self.keep_bucket, n_all)
    kept = np.sort(np.argsort(score, kind='stable')[:fresh])  # masked_select: position order
    self.dec_k[self.layer], self.dec_v[self.layer] = k, v
    h = _attend(w, pre, h, q, k, v)[kept]
    h = _mlp(w, pre, h)
    for i in range(self.layer + 1, c.decoder_depth):
      pre = f'decoder_blocks.{i}'
      q, k, v = _qkv(w, pre, h, c.decoder_num_heads)
      self.dec_k[i][kept], self.dec_v[i][kept] = k, v
      h = _mlp(w, pre, _attend(w, pre, h, q, self.dec_k[i], self.dec_v[i]))
    full = np.zeros((n_all, h.shape[1]))
    full[kept] = h
    return full, full + self.diff, set(kept.tolist())

  def _z(self, h, pred):
    w, nb = self.w, self.nb
    z = _ln(w, 'decoder_norm', h)[nb:] + w['diffusion_pos_embed_learned'][0]
    return z[np.nonzero(pred)[0]]

  def run(self, final_tokens, order):
    c = self.c
    self.enc, self.dec_k, self.dec_v = {}, {}, {}
    rank = np.empty(self.seq, int)
    rank[order] = np.arange(self.seq)
    out, prev_pred, kept_log = [], np.zeros(self.seq, bool), {}
    for step, (m_cur, _, n) in enumerate(mask_schedule(self.num_iter, c.seq_len)):
      mask = rank < m_cur
      tokens = np.where(mask[:, None], 0.0, final_tokens)
      pred = (rank >= m_cur - n) & mask
      refresh = step < self.start or (step - self.start) % self.interval == 0
      if refresh:
        hc = self._full(tokens, mask, self.cond_vec, store=True)
        hu = self._full(tokens, mask, self.fake, store=False)
        self.diff = hu - hc
      else:
        hc, hu, kept_log[step] = self._lazy(step, tokens, mask, prev_pred, pred)
      out.append(np.stack([self._z(hc, pred), self._z(hu, pred)]))
      prev_pred = pred
    return out, kept_log


@pytest.mark.parametrize('seed', [0, 1])
def test_lazy_matches_numpy_reference(model, seed):
  rng = np.random.default_rng(seed)
  orders = np.stack([rng.permutation(16) for _ in range(2)])
  labels = np.array([3, 8])
  tokens, rec, sampler = _run(model, LAZY, 2.5, orders, labels)
  lazy = sampler.last_lazy
  assert [st.index for st in lazy.steps if st.refresh] == [0, 1, 2, 5]
  assert sampler.last_stats.compiles['backbone'] == 0
  _, full, _ = _run(model, None, 2.5, orders, labels)
  w = _params(model)
  sched = mask_schedule(len(STEPS), 16)
  for i in range(2):
    ref = LazyReference(w, model.config, labels[i], start=2, interval=3, layer=2, margin=1,
                        keep_bucket=1, num_iter=len(STEPS))
    ref_z, ref_kept = ref.run(tokens[i].astype(np.float64), orders[i])
    for s, (z, _) in enumerate(rec):
      n = sched[s][2]
      got = z[i][:, :n]
      assert _rel(got, ref_z[s]) < 1e-4, (s, _rel(got, ref_z[s]))
      if s in ref_kept:
        assert set(np.asarray(lazy.kept[s][i]).tolist()) == ref_kept[s]
  # The cache is really used: lazy steps differ from the full backbone fed the same tokens.
  # (`full` ran its own head, so compare only step 3, the first lazy step, whose tokens so far
  # come from identical refresh steps.)
  assert _rel(rec[3][0], full[3][0]) > 1e-3


def test_cached_sampler_via_constructor_and_override(model):
  orders = np.stack([np.random.default_rng(5).permutation(16)])
  a = Sampler(model, enc_bucket=4, cache=LAZY)
  t1 = np.asarray(a.generate(np.array([2]), jax.random.key(1), steps=STEPS, cfg=2.0,
                             orders=orders))
  assert a.last_stats.as_dict()['cache']['refresh_steps'] == [0, 1, 2, 5]
  t2 = np.asarray(a.generate(np.array([2]), jax.random.key(1), steps=STEPS, cfg=2.0,
                             orders=orders, cache='none'))
  assert a.last_stats.cache is None
  b = Sampler(model, enc_bucket=4)
  t3 = np.asarray(b.generate(np.array([2]), jax.random.key(1), steps=STEPS, cfg=2.0,
                             orders=orders))
  np.testing.assert_array_equal(t2, t3)
  assert not np.allclose(t1, t3)
  # a second cached call compiles nothing new
  a.generate(np.array([2]), jax.random.key(2), steps=STEPS, cfg=2.0, orders=orders)
  assert sum(a.last_stats.compiles.values()) == 0


def test_config_and_flag_checks(model):
  from disa_jax.cli import flags as cli_flags
  from disa_jax.systems.mar import system
  from disa_jax.systems.mar.variants import digits_config

  config = digits_config()
  with config.unlocked():
    config.sampling.batch_size = 8   # the tests' 8 host devices
    config.sampling.cache = 'lazymar:interval=3'
  assert system.make_sampler(model, config, None).cache.interval == 3
  cli_flags.validate_sampling(config)
  with config.unlocked():
    config.sampling.cache = 'lazymar:every=3'
  with pytest.raises(UserError, match='bad item'):
    cli_flags.validate_sampling(config)
  with config.unlocked():
    config.sampling.cache = 'lazymar'
    config.system = 'flowar'
  with pytest.raises(UserError, match='MAR only'):
    cli_flags.validate_sampling(config)


def test_counted_flops():
  from disa_jax.schedules import resolve_steps
  from disa_jax.systems.mar.lazy import plan_flops
  from disa_jax.systems.mar.plan import make_plan
  from disa_jax.systems.mar.variants import MAR_VARIANTS

  c = MARConfig(**MAR_VARIANTS['mar_base'])
  r = resolve_steps(num_iter=64, preset='disa', strategy='linear', upper=50, lower=5,
                    max_timestep=950)
  plan = make_plan(c, batch_size=4, steps=r.steps, max_timestep=950, cfg=2.9)
  every = plan_flops(c, plan, parse_cache('lazymar:interval=1'))
  assert every['refresh_steps'] == 64
  # all refresh: the full last decoder block (for the CFG difference) costs a little more
  assert 0.93 < every['backbone_ratio'] <= 1.0
  assert 1.3 < every['head_ratio'] < 1.5              # the (scaled) head cache is on by default
  assert plan_flops(c, plan, parse_cache('lazymar:head=7'))['head_ratio'] > 3.0   # official
  lazy = plan_flops(c, plan, parse_cache('lazymar:head=0'))
  assert lazy['refresh_steps'] == 12                  # 0-4, 5, 14, 23, 32, 41, 50, 59
  assert 2.2 < lazy['backbone_ratio'] < 2.7 and lazy['total_ratio'] > 2.0
  assert abs(lazy['head_ratio'] - 1) < 1e-12
  both = plan_flops(c, plan, parse_cache('lazymar'))
  assert both['backbone_ratio'] == lazy['backbone_ratio']
  assert both['total_ratio'] > lazy['total_ratio'] + 0.05
  # head=1 refreshes at every denoising step: exactly the uncached head
  assert abs(plan_flops(c, plan, parse_cache('lazymar:head=1'))['head_ratio'] - 1) < 1e-12
