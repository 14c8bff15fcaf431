"""The strict FlowAR converter: architecture from shapes (also the full-size S / L / H key
listings), round trip through a model directory, .pth and .safetensors, and one-line errors with
nothing written for missing / extra / misshaped keys, wrong dtypes, non-finite values and
edited buffers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flow_testlib import check_bad_checkpoint, listed_shapes
from flowar_testlib import max_rel_error, state_dict_np, torch_model

from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import TINY, VARIANTS
from disa_jax.systems.flowar.convert import (
  FlowARConversionError,
  check_shapes,
  convert,
  convert_state,
  load_converted,
)
from disa_jax.systems.flowar.io import load_flowar


def official_shapes(data_dir, section):
  return listed_shapes(data_dir / 'flowar_state_dict_keys.txt', section)


@pytest.mark.parametrize('name', ['S', 'L', pytest.param('H', marks=pytest.mark.slow)])
def test_full_size_key_listing_converts(data_dir, name):
  shapes = official_shapes(data_dir, f'FlowAR-{name}')
  assert len(shapes) == {'S': 204, 'L': 484, 'H': 666}[name]
  assert check_shapes(shapes) == VARIANTS[name]


@pytest.fixture(scope='module')
def tiny():
  return torch_model('L', seed=3)


def test_round_trip_pth_safetensors_and_model_dir(tiny, tmp_path):
  torch.save(tiny.state_dict(), tmp_path / 'w.pth')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, tmp_path / 'w.safetensors')
  a = load_converted(tmp_path / 'w.pth')
  b = load_converted(tmp_path / 'w.safetensors')
  assert a.cfg == b.cfg == TINY['L']
  np.testing.assert_array_equal(np.asarray(a.z_proj.kernel[...]),
                                tiny.z_proj.weight.detach().numpy().T)
  out = convert(tmp_path / 'w.pth', tmp_path / 'model')
  c = load_flowar(out)
  x = jnp.ones((1, 4, 16))
  z = jnp.ones((1, 4, c.cfg.width))
  tau = jnp.asarray([500])
  assert max_rel_error(c.velocity(x, tau, z, 1), a.velocity(x, tau, z, 1)) == 0.0
  # a training checkpoint {'model', 'model_ema'} uses 'model_ema'
  torch.save({'model': tiny.state_dict(), 'model_ema': tiny.state_dict(), 'epoch': 3},
             tmp_path / 'train.pth')
  assert load_converted(tmp_path / 'train.pth').cfg == TINY['L']


def edits(sd):
  k_lin = 'flownet.res_blocks.0.mlp.fc2.weight'
  yield 'missing', {k: v for k, v in sd.items() if k != k_lin}, 'missing'
  yield 'extra', {**sd, 'flownet.extra.weight': np.ones(3, np.float32)}, 'unexpected'
  yield 'shape', {**sd, k_lin: sd[k_lin][:, :-1]}, 'shape'
  yield 'dtype', {**sd, k_lin: sd[k_lin].astype(np.int64)}, 'dtype'
  bad = sd[k_lin].copy()
  bad[0, 0] = np.nan
  yield 'nan', {**sd, k_lin: bad}, 'non-finite'
  yield 'buffer', {**sd, 'mask': np.zeros_like(sd['mask'])}, 'buffer mask'
  yield 'no buffer', {k: v for k, v in sd.items() if k != 'decoder_blocks.0.attn.rope.freqs'}, \
    'missing buffer'
  yield 'heads', {k: v for k, v in sd.items() if k != 'class_emb.weight'}, 'class_emb'


@pytest.mark.parametrize('case', range(8))
def test_bad_checkpoints_fail_in_one_line_and_write_nothing(tiny, tmp_path, case):
  _, bad, words = list(edits(state_dict_np(tiny)))[case]
  check_bad_checkpoint(bad, words, convert_state=convert_state, convert=convert,
                       error=FlowARConversionError, tmp_path=tmp_path)


def test_not_a_file_and_existing_output(tiny, tmp_path):
  with pytest.raises(FlowARConversionError, match='does not exist'):
    convert(tmp_path / 'nope.pth', tmp_path / 'out')
  (tmp_path / 'out').mkdir()
  torch.save(tiny.state_dict(), tmp_path / 'w.pth')
  with pytest.raises(UserError, match='already exists'):
    convert(tmp_path / 'w.pth', tmp_path / 'out')
