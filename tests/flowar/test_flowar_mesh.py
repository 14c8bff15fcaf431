"""FlowAR data-parallel sampling: with a mesh over the 8 fake CPU devices (tests/conftest.py) the
batch, KV cache and samples are sharded over the devices, and the tokens equal the one-device
run (with CFG, whose class / null halves combine across devices, and with per-image noise)."""

import jax
import numpy as np
import pytest

from disa_jax import sharding as shd
from disa_jax.errors import UserError
from disa_jax.systems.flowar.engine import FlowAREngineSampler
from disa_jax.systems.flowar.sampling import FlowARSampler

STEPS = (3, 3, 2, 2, 2)
TOL = 1e-5   # max |a - b| / max |b|: only the reduction order of the sharded matmuls may differ


@pytest.fixture(scope='module')
def model():
  from flowar_testlib import jax_model, torch_model

  return jax_model(torch_model('S', seed=5))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _spans_all(x, mesh) -> bool:
  return (x.sharding.is_equivalent_to(shd.batch_sharded(mesh), x.ndim)
          and len(x.sharding.device_set) == 8 and len(x.addressable_shards) == 8
          and x.addressable_shards[0].data.shape[0] == x.shape[0] // 8)


@pytest.mark.slow   # ~40-90 s cold on 2 cores: compiles the 1- and 8-device programs
def test_engine_sampler_on_8_devices_equals_one_device(model):
  assert jax.device_count() == 8
  mesh = shd.make_mesh(8)
  labels = np.arange(8, dtype=np.int32) % 10
  key = jax.random.key(11)
  kw = dict(steps=STEPS, cfg=2.5, guidance=0.9, image_ids=np.arange(100, 108))
  one = FlowAREngineSampler(model).generate(labels, key, **kw)
  sampler = FlowAREngineSampler(model, mesh=mesh)
  assert sampler.mesh is mesh                 # the shared runner checks batch sizes against it
  par = sampler.generate(labels, key, **kw)
  assert par.shape == one.shape == (8, 256, 16)
  assert _spans_all(par, mesh)
  assert _rel(par, one) <= TOL
  assert np.abs(np.asarray(one)).max() > 0.1   # a real sample, not zeros
  with pytest.raises(UserError, match='multiple of the 8'):
    sampler.generate(labels[:4], key, **kw)


def test_scale_loop_state_is_sharded_on_8_devices(model):
  mesh = shd.make_mesh(8)
  rng = np.random.default_rng(2)
  b = 8
  noise = [rng.standard_normal((2 * b, m * m, 16)).astype(np.float32) for m in model.cfg.scales]
  labels = np.arange(b) % 10
  kw = dict(steps=STEPS, cfg=3.0, guidance=1.0, noise=noise)
  one = FlowARSampler(model).generate(labels, **kw)
  par, st = FlowARSampler(model, mesh=mesh).generate(labels, return_state=True, **kw)
  assert _rel(par, one) <= TOL
  for sample in st.samples:                   # every scale's sample (B, n_s, 16)
    assert _spans_all(sample, mesh)
  leaves = jax.tree.leaves(st.cache)          # KV cache (2B, H, L, hd) per layer
  assert leaves and all(_spans_all(k, mesh) for k in leaves)
