"""D-AR as a System (in process, tiny config): the seam's hooks, per-image randomness that does
not depend on the batch, the early-stop and coarser-grid knobs against the official decode, and
layout prefixes."""

import jax
import numpy as np
import pytest

from disa_jax.errors import UserError
from disa_jax.systems.base import get_system


@pytest.fixture(scope='module')
def tiny():
  from disa_jax.systems.dar.config import dar_config

  config = dar_config('l', tiny=True)
  system = get_system('dar')
  model, source = system.build_model(config, seed=0)
  rs = system.make_sampler(model, config, None)
  rs.set_key(jax.random.key(3))
  return config, system, model, rs


def test_system_hooks(tiny):
  config, system, _, rs = tiny
  assert system.name == 'dar' and system.commands == 'disa_jax.systems.dar.commands'
  plan = system.stage_plan(config.sampling)
  assert plan.steps == (1, 1, 1, 1) and plan.max_timestep is None        # 4 groups, 1 NFE each
  with config.unlocked():
    config.sampling.decoder_steps = 2
    assert system.stage_plan(config.sampling).steps == (1, 1)
    config.sampling.decoder_steps = 0
  assert list(system.conditions(config, 5)) == [0, 1, 2, 3, 4]
  assert system.condition_count(config) == 10
  ids = rs.generate(np.array([1, 2]), jax.random.key(3), image_ids=np.array([0, 1]))
  assert ids.shape == (2, 16) and ids.dtype == np.int32


def test_image_randomness_is_independent_of_the_batch(tiny):
  _, _, _, rs = tiny
  full = rs.run(np.array([4, 5, 6]), np.array([7, 8, 9]))
  alone = rs.run(np.array([6]), np.array([9]))
  np.testing.assert_array_equal(full.ids[2], alone.ids[0])
  np.testing.assert_allclose(full.images[2], alone.images[0], atol=1e-5)
  assert not np.allclose(full.images[0], full.images[1], atol=1e-3)   # distinct images


def test_coarser_grid_equals_the_official_decode_with_fewer_steps(tiny):
  _, _, _, rs = tiny
  labels, image_ids = np.array([1, 2]), np.array([0, 1])
  try:
    rs.decoder_steps = 2
    gen = rs.run(labels, image_ids, previews=True)
  finally:
    rs.decoder_steps = None
  # grid u = 0, 1/2 reads groups 0 and 2: the GPT stops after 3 groups (12 ids)
  assert (gen.ids[:, 12:] == 0).all() and gen.previews.shape[0] == 2
  _, noise = rs.image_randomness(image_ids)
  ref = rs.tok.decode(gen.ids, noise, num_steps=2)
  np.testing.assert_allclose(gen.images, ref, atol=2e-5)
  full = rs.run(labels, image_ids)
  np.testing.assert_array_equal(full.ids[:, :12], gen.ids[:, :12])     # same draws
  assert np.abs(full.images - gen.images).mean() > 1e-3


def test_early_stop_gives_the_clip_steps_preview(tiny):
  _, _, _, rs = tiny
  labels, image_ids = np.array([3]), np.array([5])
  gen = rs.run(labels, image_ids, num_tokens=8)
  full = rs.run(labels, image_ids)
  np.testing.assert_array_equal(gen.ids[:, :8], full.ids[:, :8])
  _, noise = rs.image_randomness(image_ids)
  ref = rs.tok.decode(full.ids, noise, clip_steps=2)
  np.testing.assert_allclose(gen.images, ref, atol=2e-5)


def test_layout_prefix_is_kept(tiny):
  from disa_jax.systems.dar.sampling import layout_prefix

  _, _, _, rs = tiny
  ref = np.tanh(np.random.default_rng(0).standard_normal((64, 64, 3))).astype(np.float32)
  prefix = layout_prefix(rs.tok, ref, 2)
  gen = rs.run(np.array([1, 2]), np.array([0, 1]), prefix=prefix)
  assert (gen.ids[:, :8] == prefix).all()
  np.testing.assert_array_equal(prefix, rs.tok.encode(ref[None])[0, :8])


@pytest.mark.parametrize('field,value,message', [
  ('prefix_groups', 2, '--prefix-groups needs --layout-from'),
  ('num_tokens', 17, '--num-tokens must be in 1..16'),
  ('decoder_steps', 5, '--decoder-steps must be in 1..4'),
  ('cfg', '0.5,4', 'needs every scale > 1'),
  ('top_p', 0.0, 'top_p in (0, 1]'),
])
def test_validate_rejects(tiny, field, value, message):
  config, system, _, _ = tiny
  bad = config.copy_and_resolve_references()
  with bad.unlocked():
    bad.sampling[field] = value
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')
                     .replace('[', r'\[').replace(']', r'\]')):
    system.validate(bad)
