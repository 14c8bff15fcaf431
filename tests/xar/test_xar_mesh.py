"""xAR data-parallel sampling: with a mesh over the 8 fake CPU devices (tests/conftest.py) the
batch, the per-step noise, the KV cache and the cells are sharded over the devices, and the
tokens equal the one-device run (CFG on, per-image noise and injected noise)."""

import jax
import numpy as np
import pytest
from xar_testlib import injected_noise, jax_model, torch_model

from disa_jax import sharding as shd
from disa_jax.errors import UserError
from disa_jax.systems.xar.engine import XAREngineSampler
from disa_jax.systems.xar.sampling import XARSampler

STEPS = (3, 3, 3, 3)
TOL = 1e-5   # max |a - b| / max |b|: only the reduction order of the sharded matmuls may differ


@pytest.fixture(scope='module')
def model():
  return jax_model(torch_model(seed=4))


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
  key = jax.random.key(3)
  kw = dict(steps=STEPS, cfg=2.0, image_ids=np.arange(40, 48))
  one = XAREngineSampler(model).generate(labels, key, **kw)
  sampler = XAREngineSampler(model, mesh=mesh)
  assert sampler.mesh is mesh                 # the shared runner checks batch sizes against it
  par = sampler.generate(labels, key, **kw)
  assert par.shape == one.shape == (8, 256, 16)
  assert _spans_all(par, mesh)
  assert _rel(par, one) <= TOL
  assert np.abs(np.asarray(one)).max() > 0.1   # a real sample, not zeros
  with pytest.raises(UserError, match='multiple of the 8'):
    sampler.generate(labels[:4], key, **kw)


def test_cell_loop_state_is_sharded_on_8_devices(model):
  mesh = shd.make_mesh(8)
  b = 8
  noise = injected_noise(STEPS, b, seed=5)
  labels = np.arange(b) % 10
  _, one = XARSampler(model).generate(labels, steps=STEPS, cfg=3.0, noise=noise,
                                      return_tokens=True)
  sampler = XARSampler(model, mesh=mesh)
  st = sampler.start(labels)
  for s, n in enumerate(STEPS):
    st = sampler.step(st, num_steps=n, cfg=3.0, initial=noise[s][0], step_noise=noise[s][1])
  par = np.concatenate([np.asarray(x) for x in st.samples], axis=1)
  assert _rel(par, one) <= TOL
  for cell in st.samples:                     # every cell's sample (B, 64, 16)
    assert _spans_all(cell, mesh)
  leaves = jax.tree.leaves(st.cache)          # KV cache (2B, H, 128, hd) per layer
  assert leaves and all(_spans_all(k, mesh) for k in leaves)
