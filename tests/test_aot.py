"""Traces kept on disk (`engine/aot.py`) and the Sampler's compile bookkeeping (issue 20)."""

import json
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import tiny_model

from disa_jax.engine import aot
from disa_jax.schedules import resolve_steps
from disa_jax.sharding import make_mesh
from disa_jax.systems.mar.sampling import Sampler

DISA = resolve_steps(num_iter=6, preset='disa', upper=8, lower=3)
KW = dict(steps=DISA.steps, max_timestep=950, cfg=2.0)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def model():
  return tiny_model(seed=5)


def _traces(d):
  return sorted(Path(d).glob('*' + aot.TRACE_SUFFIX))


@pytest.mark.slow   # ~90-100 s on the 2-core machine (fresh-clone durations, 2026-11-30)
def test_traces_are_reused_with_the_same_tokens(model, tmp_path):
  labels, key = np.array([1, 2]), jax.random.key(6)
  plain = Sampler(model, enc_bucket=4).generate(labels, key, **KW)
  first = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  a = first.generate(labels, key, **KW)
  n = sum(first.trace_counts.values())
  assert len(_traces(tmp_path)) == n and sum(first.trace_loads.values()) == 0
  second = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  b = second.generate(labels, key, **KW)
  assert sum(second.trace_loads.values()) == n == sum(second.trace_counts.values())
  np.testing.assert_array_equal(np.asarray(a), np.asarray(plain))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(plain))


@pytest.mark.slow   # ~90-100 s on the 2-core machine (fresh-clone durations, 2026-11-30)
def test_trace_key_follows_what_the_trace_depends_on(model, tmp_path):
  labels, key = np.array([1, 2]), jax.random.key(6)
  Sampler(model, enc_bucket=4, trace_cache=str(tmp_path)).generate(labels, key, **KW)
  n = len(_traces(tmp_path))
  other = Sampler(tiny_model(seed=5, decoder_depth=1), enc_bucket=4, trace_cache=str(tmp_path))
  other.generate(labels, key, **KW)   # another architecture: nothing reused
  assert sum(other.trace_loads.values()) == 0 and len(_traces(tmp_path)) > n
  cfg1 = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  cfg1.generate(labels, key, **dict(KW, cfg=1.0))   # no CFG branch: other static arguments
  assert cfg1.trace_loads['backbone'] == 0
  batch4 = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  batch4.generate(np.arange(4), key, **KW)             # other shapes
  assert batch4.trace_loads['backbone'] == 0


def test_damaged_traces_are_traced_again_and_replaced(model, tmp_path):
  labels, key = np.array([1, 2]), jax.random.key(6)
  ref = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path)).generate(labels, key, **KW)
  for p in _traces(tmp_path):
    p.write_bytes(b'not a trace')
  s = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  np.testing.assert_array_equal(np.asarray(s.generate(labels, key, **KW)), np.asarray(ref))
  assert sum(s.trace_loads.values()) == 0
  again = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  again.generate(labels, key, **KW)
  assert sum(again.trace_loads.values()) == sum(again.trace_counts.values())


def test_unwritable_trace_dir_warns_and_samples(model, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  s = Sampler(model, enc_bucket=4, trace_cache=str(blocker / 'traces'))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = s.generate(np.array([1, 2]), jax.random.key(6), **KW)
  assert np.isfinite(np.asarray(out)).all()
  assert any('not writable' in str(w.message) for w in caught)


@pytest.mark.slow   # ~90-100 s on the 2-core machine (fresh-clone durations, 2026-11-30)
def test_traces_on_a_mesh_match(model, tmp_path):
  mesh = make_mesh(num_devices=2)
  labels, key = np.array([1, 2]), jax.random.key(6)
  ref = Sampler(model, enc_bucket=4, mesh=mesh).generate(labels, key, **KW)
  Sampler(model, enc_bucket=4, mesh=mesh, trace_cache=str(tmp_path)).generate(labels, key, **KW)
  s = Sampler(model, enc_bucket=4, mesh=mesh, trace_cache=str(tmp_path))
  out = s.generate(labels, key, **KW)
  assert sum(s.trace_loads.values()) == sum(s.trace_counts.values()) > 0
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert out.sharding.spec == ref.sharding.spec


def test_lazy_cache_buckets_compile_without_running(model, tmp_path):
  """The LazyMAR buckets go through the same compile path: traced once, reused, and lowered
  against the refresh step's output shapes (nothing runs inside `compile` without warmup)."""
  labels, key = np.array([1, 2]), jax.random.key(6)
  kw = dict(KW, cache='lazymar:start=1,interval=2')
  a = Sampler(model, enc_bucket=4).generate(labels, key, **kw)
  s = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  b = s.generate(labels, key, **kw)
  assert s.trace_counts['lazy_step'] > 0 and s.last_stats.compile_split['warmup'] == 0
  s2 = Sampler(model, enc_bucket=4, trace_cache=str(tmp_path))
  c = s2.generate(labels, key, **kw)
  assert s2.trace_loads['lazy_step'] == s2.trace_counts['lazy_step']
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(a))


def test_compile_runs_and_compiles_only_new_buckets(model):
  """A second `compile` / `generate` on the same plan compiles nothing and runs no
  placeholder batch (earlier, every call re-ran one placeholder pass per bucket)."""
  labels, key = np.array([1, 2]), jax.random.key(6)
  s = Sampler(model, enc_bucket=4, warmup=True)
  plan = s.plan(2, **KW)
  s.compile(plan)
  warm = s.phase_s['warmup']
  assert warm > 0 and s.phase_s['lower'] > 0 and s.phase_s['xla'] > 0
  before = dict(s.trace_counts)
  s.generate(labels, key, **KW)
  assert dict(s.trace_counts) == before and s.phase_s['warmup'] == warm
  assert s.last_stats.compile_split == {'lower': 0.0, 'xla': 0.0, 'wait': 0.0, 'warmup': 0.0}
  cold = Sampler(model, enc_bucket=4)   # default: no placeholder runs at all
  cold.generate(labels, key, **KW)
  assert cold.phase_s['warmup'] == 0 and cold.last_stats.compile_split['lower'] > 0


def test_traces_are_reused_by_a_new_process(tmp_path):
  """Trace keys are stable across processes (no ids or hash seeds in them)."""
  script = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(REPO / 'tests')!r})
    import jax, numpy as np
    from helpers import tiny_model
    from disa_jax.schedules import resolve_steps
    from disa_jax.systems.mar.sampling import Sampler
    plan = resolve_steps(num_iter=4, preset='disa', upper=6, lower=3)
    s = Sampler(tiny_model(seed=5), enc_bucket=4, trace_cache={str(tmp_path)!r})
    out = s.generate(np.array([1, 2]), jax.random.key(6), steps=plan.steps, max_timestep=950,
                     cfg=2.0)
    print(json.dumps(dict(loads=sum(s.trace_loads.values()),
                          compiles=sum(s.trace_counts.values()),
                          checksum=float(np.abs(np.asarray(out)).sum()))))
  """)
  runs = []
  for _ in range(2):
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
  assert runs[0]['loads'] == 0 and runs[1]['loads'] == runs[1]['compiles'] > 0
  assert runs[0]['checksum'] == runs[1]['checksum']


def test_background_compile_same_tokens_and_every_bucket_collected(model):
  """Buckets compiled in background threads while sampling starts: the same tokens, every
  executable collected once, the waits counted as compile time (not sampling time)."""
  labels, key = np.array([1, 2]), jax.random.key(6)
  ref = Sampler(model, enc_bucket=4)
  a = ref.generate(labels, key, **KW)
  bg = Sampler(model, enc_bucket=4, background_compile=True, compile_threads=2)
  t0 = time.perf_counter()
  b = bg.generate(labels, key, **KW)
  total = time.perf_counter() - t0
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  assert dict(bg.trace_counts) == dict(ref.trace_counts) and not bg._pending
  st = bg.last_stats
  assert st.compile_split['wait'] >= 0 and st.compile_s >= st.compile_split['wait']
  assert st.wall_s + st.compile_s <= total + 1e-3
  again = bg.generate(labels, key, **KW)     # nothing new: no compile, no wait
  np.testing.assert_array_equal(np.asarray(again), np.asarray(a))
  assert bg.last_stats.compile_split['wait'] == 0 and bg.last_stats.compiles['backbone'] == 0
