"""configs/flowar/{s,l,h}.py: official settings, :cpu / :tiny variants, and a :tiny config
driving the sampler end to end (steps from the config, compile count bounded)."""

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import VARIANTS, FlowARConfig
from disa_jax.systems.flowar.model import FlowAR
from disa_jax.systems.flowar.sampling import FlowARSampler
from disa_jax.systems.flowar.steps import steps_from_config


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(f'flowar_{name}', f'configs/flowar/{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize('name,cfg,base_cfg,g,steps', [
  ('s', 4.2, 4.3, 0.9, [25, 22, 20, 17, 15]),
  ('l', 2.4, 2.4, 0.9, [25, 22, 20, 17, 15]),
  ('h', 2.4, 2.4, 0.7, [50, 41, 32, 23, 15])])
def test_official_settings(name, cfg, base_cfg, g, steps):
  c = load(name)
  assert c.system == 'flowar'
  assert FlowARConfig.from_dict(c.model.to_dict()) == VARIANTS[name.upper()]
  assert (c.sampling.cfg, c.sampling.baseline_cfg, c.sampling.guidance) == (cfg, base_cfg, g)
  assert steps_from_config(c.sampling, c.variant) == steps
  c.sampling.preset = 'baseline'
  assert steps_from_config(c.sampling, c.variant) == [steps[0]] * 5
  c.sampling.steps = '9,8,7,6,5'
  assert steps_from_config(c.sampling, c.variant) == [9, 8, 7, 6, 5]
  assert load(name, 'cpu').model.scales == [1, 2, 4, 8, 16]
  with pytest.raises(UserError, match='unknown FlowAR config argument'):
    load(name, 'gpu')


def test_tiny_config_samples():
  c = load('l', 'tiny')
  model = FlowAR(FlowARConfig.from_dict(c.model.to_dict()), rngs=nnx.Rngs(0))
  sampler = FlowARSampler(model)
  steps = steps_from_config(c.sampling, c.variant)
  assert steps == [6, 5, 4, 3, 2]
  out = sampler.generate(np.arange(2), steps=steps, cfg=c.sampling.cfg,
                         guidance=c.sampling.guidance, key=jax.random.key(0))
  assert out.shape == (2, 16, 16, 16) and np.isfinite(np.asarray(out)).all()
  assert sampler.compile_count == 5
  sampler.generate(np.arange(2), steps=steps, cfg=c.sampling.cfg, guidance=c.sampling.guidance,
                   key=jax.random.key(1))
  assert sampler.compile_count == 5


def test_sampler_input_errors():
  model = FlowAR(FlowARConfig.from_dict(load('s', 'tiny').model.to_dict()), rngs=nnx.Rngs(0))
  sampler = FlowARSampler(model)
  with pytest.raises(UserError, match='one step count per scale'):
    sampler.generate(np.arange(2), steps=[4, 4], key=jax.random.key(0))
  with pytest.raises(UserError, match='PRNG'):
    sampler.generate(np.arange(2), steps=[4] * 5)
  with pytest.raises(UserError, match='expected \\(4, 1, 16\\)'):
    sampler.generate(np.arange(2), steps=[4] * 5, cfg=2.0,
                     noise=[np.zeros((2, s * s, 16), np.float32) for s in (1, 2, 4, 8, 16)])
  assert sampler.compile_count == 0
