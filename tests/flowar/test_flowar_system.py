"""FlowAR as a System: the engine sampler contract (per-image randomness independent of the
batch, injected-noise agreement with `FlowARSampler`, compile counts), the hooks, the decoder
layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.base import get_system
from disa_jax.systems.flowar.config import TINY, flowar_config
from disa_jax.systems.flowar.engine import FlowAREngineSampler
from disa_jax.systems.flowar.model import FlowAR
from disa_jax.systems.flowar.sampling import FlowARSampler

STEPS = (4, 3, 3, 2, 2)


@pytest.fixture(scope='module')
def model():
  from flowar_testlib import jax_model, torch_model

  return jax_model(torch_model('S', seed=3))


def test_system_found_by_name():
  system = get_system('flowar')
  assert system.name == 'flowar'
  config = flowar_config('S', 'tiny')
  assert system.stage_plan(config.sampling).steps == (6, 5, 4, 3, 2)
  with config.unlocked():
    config.sampling.preset = 'baseline'
  assert system.stage_plan(config.sampling).steps == (6,) * 5
  with config.unlocked():
    config.sampling.steps = '7,6,5,4,3'
  assert system.stage_plan(config.sampling).steps == (7, 6, 5, 4, 3)


def test_randomness_per_image_not_per_batch(model):
  sampler = FlowAREngineSampler(model, cfg=2.0, guidance=0.9)
  key = jax.random.key(7)
  labels = np.array([1, 2, 3, 4], np.int32)
  full = np.asarray(sampler.generate(labels, key, steps=STEPS, image_ids=np.arange(10, 14)))
  part = np.asarray(sampler.generate(labels[2:], key, steps=STEPS, image_ids=np.arange(12, 14)))
  np.testing.assert_allclose(part, full[2:], rtol=0, atol=1e-4)   # batch-shape rounding
  other = np.asarray(sampler.generate(labels[2:], jax.random.key(8), steps=STEPS,
                                      image_ids=np.arange(12, 14)))
  assert np.abs(other - part).max() > 1e-2          # the key matters
  shifted = np.asarray(sampler.generate(labels[2:], key, steps=STEPS,
                                        image_ids=np.arange(0, 2)))
  assert np.abs(shifted - part).max() > 1e-2        # so does the image id


def test_injected_noise_matches_flowar_sampler(model):
  rng = np.random.default_rng(0)
  b, cfg = 3, 3.0
  noise = [rng.standard_normal((2 * b, s * s, 16)).astype(np.float32)
           for s in model.cfg.scales]
  labels = np.array([0, 5, 9])
  ref = FlowARSampler(model).generate(labels, steps=STEPS, cfg=cfg, guidance=0.8, noise=noise)
  got = FlowAREngineSampler(model).generate(labels, None, steps=STEPS, cfg=cfg, guidance=0.8,
                                            noise=noise)
  assert got.shape == (b, 256, 16)
  np.testing.assert_allclose(np.asarray(got).reshape(b, 16, 16, 16).transpose(0, 3, 1, 2),
                             np.asarray(ref), rtol=0, atol=1e-6)


def test_compile_once_per_shape(model):
  sampler = FlowAREngineSampler(model, cfg=1.0)
  plan = sampler.plan(2, steps=STEPS)
  assert plan.rows == 2 and plan.evals == (4, 2, 2, 2, 2)
  sampler.compile(plan)
  assert len(sampler.compile_log) == 10        # 5 scale functions + 5 noise draws
  sampler.generate(np.array([1, 2]), jax.random.key(0), steps=STEPS)
  assert sampler.last_stats.compiles == {'scale': 0} and sampler.last_stats.compile_s == 0
  sampler.generate(np.array([1, 2]), jax.random.key(0), steps=(6, 6, 6, 6, 6), timed=True)
  st = sampler.last_stats
  assert st.compiles == {'scale': 0}           # the step count is traced: same executables
  assert st.trunk_s > 0 and st.head_s > 0
  rep = st.as_dict()
  assert rep['steps_actual'] == [6] * 5 and rep['head_token_steps_per_image'] == 341 * 6
  sampler.generate(np.array([1, 2]), jax.random.key(0), steps=(6, 6, 6, 6, 6), solver='heun')
  assert sampler.last_stats.compiles == {'scale': 5}     # another solver: all new
  sampler.generate(np.array([1, 2]), jax.random.key(0), steps=(66, 2, 2, 2, 2))
  assert sampler.last_stats.compiles == {'scale': 1}     # 66 evaluations: the next bucket
  assert {k[3] for k in sampler.compile_log if k[0] == 'scale'} == {64, 128}


def test_inert_mar_options_are_refused(model):
  sampler = FlowAREngineSampler(model)
  for kw, word in [({'temperature': 0.5}, 'temperature'), ({'max_timestep': 900}, 'clamp'),
                   ({'cfg_schedule': 'constant'}, 'linearly')]:
    with pytest.raises(UserError, match=word):
      sampler.plan(2, steps=STEPS, **kw)
  with pytest.raises(UserError, match='one step count per scale'):
    sampler.plan(2, steps=(3, 3))


def test_validate_rows():
  system = get_system('flowar')
  rows = [('guidance', 1.5, 'guidance'), ('guidance', float('nan'), 'guidance'),
          ('baseline_cfg', -1.0, 'baseline_cfg'), ('temperature', 0.7, 'temperature'),
          ('cfg_schedule', 'constant', 'linearly'), ('steps', '5,5', 'one per AR step'),
          ('lower_steps', 1, 'at least 2')]
  for field, value, word in rows:
    config = flowar_config('S', 'tiny')
    with config.unlocked():
      config.sampling[field] = value
    with pytest.raises(UserError, match=word):
      system.validate(config)


def test_decoder_layout_is_row_major_nhwc():
  """make_decoder's VAETokenizer decodes vae.decode(tokens.reshape(B, 16, 16, 16) / scale)."""
  from disa_jax.systems.flowar.system import latent_layout
  from disa_jax.tokenizers.image import VAETokenizer
  from disa_jax.tokenizers.kl16 import AutoencoderKL, VAEConfig

  vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                                attn_levels=()), rngs=nnx.Rngs(0))
  cfg = TINY['S']
  tok = VAETokenizer(latent_layout(cfg), vae, scale=0.2325, devices=jax.devices()[:1])
  tokens = np.random.default_rng(1).standard_normal((1, 256, 16)).astype(np.float32)
  got = tok.decode_float(tokens)
  want = np.asarray(vae.decode(jnp.asarray(tokens.reshape(1, 16, 16, 16) / 0.2325)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_checkpoint_architecture_mismatch(tmp_path):
  from disa_jax.checkpoint import CheckpointError
  from disa_jax.systems.flowar.io import save_flowar

  path = save_flowar(tmp_path / 'm', FlowAR(TINY['S'], rngs=nnx.Rngs(0)))
  system = get_system('flowar')
  config = flowar_config('L', 'tiny')
  with config.unlocked():
    config.checkpoint = str(path)
  with pytest.raises(CheckpointError, match='head_cross'):
    system.build_model(config)
  config = flowar_config('S', 'tiny')
  with config.unlocked():
    config.checkpoint = str(path)
  model, source = system.build_model(config)
  assert isinstance(model, FlowAR) and 'checkpoint' in source
