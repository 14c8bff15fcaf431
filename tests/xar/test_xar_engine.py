"""xAR under the engine's sampler contract (`systems/xar/engine.py`): per-image randomness that
does not depend on the batch an image lands in, raster order, injected draws equal to the
cell sampler's, compile bookkeeping, inert MAR options, and `disa-bench`'s run parsing."""

import jax
import numpy as np
import pytest
from xar_testlib import jax_model, torch_model

from disa_jax.errors import UserError
from disa_jax.systems.xar.bench import parse_runs
from disa_jax.systems.xar.config import xar_config
from disa_jax.systems.xar.engine import XAREngineSampler
from disa_jax.systems.xar.model import cell_order

STEPS = (3, 3, 3, 3)
KEY = jax.random.key(11)


@pytest.fixture(scope='module')
def engine():
  with jax.default_matmul_precision('highest'):
    yield XAREngineSampler(jax_model(torch_model(seed=2)), cfg=2.0,
                           matmul_precision='highest')


def test_randomness_per_image_not_per_batch(engine):
  """Image i's noise comes from (key, i): the same images in another batch split / order give
  the same tokens; two images of one class with different ids differ."""
  a = np.asarray(engine.generate([4, 4], KEY, steps=STEPS, image_ids=[0, 1]))
  b = np.asarray(engine.generate([4, 4], KEY, steps=STEPS, image_ids=[2, 3]))
  assert np.abs(a[0] - a[1]).max() > 0.1               # same class, other stream
  swapped = np.asarray(engine.generate([4, 4], KEY, steps=STEPS, image_ids=[3, 0]))
  np.testing.assert_allclose(swapped[1], a[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(swapped[0], b[1], rtol=0, atol=1e-5)
  # a batch of 4 holds the same 4 images as the two batches of 2
  four = np.asarray(engine.generate([4, 4, 4, 4], KEY, steps=STEPS, image_ids=[0, 1, 2, 3]))
  np.testing.assert_allclose(four, np.concatenate([a, b]), rtol=0, atol=1e-5)
  other = np.asarray(engine.generate([4, 4], jax.random.key(12), steps=STEPS, image_ids=[0, 1]))
  assert np.abs(other - a).max() > 0.1                 # the key matters


def test_injected_draws_and_raster_order(engine):
  """generate == the cell sampler run on the same draws, scattered from cell-major to raster."""
  labels, ids = np.array([1, 6]), np.array([5, 9])
  got = np.asarray(engine.generate(labels, KEY, steps=STEPS, image_ids=ids))
  draws = engine.draws(KEY, ids, STEPS)
  _, cell_major = engine.inner.generate(labels, steps=STEPS, cfg=2.0, noise=draws,
                                        return_tokens=True)
  want = np.empty_like(np.asarray(cell_major))
  want[:, cell_order(engine.config)] = np.asarray(cell_major)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # raster row 0 = the first 8 tokens of cell 0 then of cell 1 (top-left, top-right)
  np.testing.assert_array_equal(got[:, :8], np.asarray(cell_major)[:, :8])
  np.testing.assert_array_equal(got[:, 8:16], np.asarray(cell_major)[:, 64:72])
  assert got.shape == (2, 256, 16)


def test_plan_stats_and_compiles(engine):
  plan = engine.plan(2, steps=STEPS, cfg=2.0)
  rep = plan.report()
  assert rep['num_iter'] == 4 and rep['steps_actual'] == list(STEPS)
  assert rep['cell_cfg'] == [1.0, pytest.approx(4 / 3), pytest.approx(5 / 3), 2.0]
  assert rep['head_token_steps_per_image'] == 64 * 12 + 3 * 64
  engine.generate([0, 1], KEY, steps=STEPS)   # compiles here unless an earlier test on this
  engine.generate([0, 1], KEY, steps=STEPS)   # xdist worker did; the repeat never compiles
  assert engine.last_stats.compile_s == 0.0
  assert engine.last_stats.compiles == {'backbone': 0}
  assert engine.compile(plan) == 0.0
  keys = [k for k in engine.compile_log if k[0] == 'backbone' and k[3] == 2]
  assert sorted(k[1] for k in keys) == [0, 1, 2, 3]
  assert {(s, n, b) for s, n, b in engine.inner.traces} <= {(s, 64, b) for s in range(4)
                                                             for b in (2, 3, 4)}
  assert all(v == 1 for v in engine.inner.traces.values())  # never retraced


@pytest.mark.parametrize('kwargs, words', [
  ({'max_timestep': 900}, 'no timestep clamp'),
  ({'cfg_schedule': 'constant'}, 'linearly over cells'),
  ({'temperature': 0.9}, 'no temperature'),
  ({'steps': (3, 3, 3)}, 'one step count per cell'),
])
def test_inert_options_refused(engine, kwargs, words):
  args = {'steps': STEPS, **kwargs}
  with pytest.raises(UserError, match=words):
    engine.plan(2, **args)


def test_labels_out_of_range(engine):
  with pytest.raises(UserError, match=r'class labels must be in \[0, 10\)'):
    engine.generate([0, 10], KEY, steps=STEPS)


def test_bench_run_parsing():
  c = xar_config('L', 'tiny')                  # tiny: baseline 5, disa 6 -> 3
  assert parse_runs(None, c) == [('baseline', (5, 5, 5, 5)), ('disa', (6, 5, 4, 3))]
  assert parse_runs('a=baseline:7,b=disa:9:3,c=8/6/4/3,d=mar', c) == [
    ('a', (7,) * 4), ('b', (9, 7, 5, 3)), ('c', (8, 6, 4, 3)), ('d', (5,) * 4)]
  for bad in ('x', 'a=', 'a=ddim:4', 'a=baseline:4:3', 'a=disa:x', 'a=4/4/4'):
    with pytest.raises(UserError):
      parse_runs(bad, c)
  with pytest.raises(UserError, match='at least 3'):
    parse_runs('a=disa:9:2', c)


def test_compile_is_ahead_of_time(engine, monkeypatch):
  """`compile` builds every cell executable of a new batch size from abstract shapes without
  sampling a batch; the run that follows compiles nothing more."""
  steps = (3, 4, 3, 5)
  plan = engine.plan(3, steps=steps, cfg=2.0)
  with monkeypatch.context() as m:
    m.setattr(engine.inner, 'step', lambda *a, **k: pytest.fail('compile sampled a batch'))
    assert engine.compile(plan) > 0
  assert all(engine.inner.compiled(s, n, 3) for s, n in enumerate(steps))
  assert {k: v for k, v in engine.inner.traces.items() if k[2] == 3} == {
    (s, 64, 3): 1 for s in range(4)}
  before = engine.compile_count
  got = np.asarray(engine.generate([1, 2, 3], KEY, steps=steps, image_ids=[0, 1, 2]))
  assert engine.compile_count == before and engine.last_stats.compile_s == 0.0
  draws = engine.draws(KEY, np.arange(3), steps)
  _, cell_major = engine.inner.generate([1, 2, 3], steps=steps, cfg=2.0, noise=draws,
                                        return_tokens=True)
  np.testing.assert_allclose(got[:, cell_order(engine.config)], np.asarray(cell_major),
                             rtol=0, atol=1e-6)
