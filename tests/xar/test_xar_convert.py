"""The strict xAR converter: architecture from shapes (also the full-size B / L / H key
listings), round trip through a model directory, .pth and .safetensors, and one-line errors with
nothing written for missing / extra / misshaped keys, wrong dtypes, non-finite values, edited
buffers (mask, RoPE tables) and FlowAR files."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flow_testlib import check_bad_checkpoint, listed_shapes
from xar_testlib import max_rel_error, state_dict_np, torch_model

from disa_jax.errors import UserError
from disa_jax.systems.xar.config import TINY, VARIANTS
from disa_jax.systems.xar.convert import (
  XARConversionError,
  check_shapes,
  convert,
  convert_state,
  load_converted,
)
from disa_jax.systems.xar.io import load_xar


def official_shapes(data_dir, section):
  return listed_shapes(data_dir / 'xar_state_dict_keys.txt', section)


@pytest.mark.parametrize('name', ['B', pytest.param('L', marks=pytest.mark.slow),
                                  pytest.param('H', marks=pytest.mark.slow)])
def test_full_size_key_listing_converts(data_dir, name):
  shapes = official_shapes(data_dir, f'xAR-{name}')
  assert len(shapes) == {'B': 257, 'L': 497, 'H': 617}[name]
  assert check_shapes(shapes) == VARIANTS[name]


def test_parameter_counts_match_the_official_models():
  from flax import nnx

  from disa_jax.systems.xar.model import XAR
  abstract = nnx.eval_shape(lambda: XAR(VARIANTS['B'], rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert count == 172_638_224


@pytest.fixture(scope='module')
def tiny():
  return torch_model(seed=3)


def test_round_trip_pth_safetensors_and_model_dir(tiny, tmp_path):
  torch.save(tiny.state_dict(), tmp_path / 'w.pth')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, tmp_path / 'w.safetensors')
  a = load_converted(tmp_path / 'w.pth')
  b = load_converted(tmp_path / 'w.safetensors')
  assert a.cfg == b.cfg == TINY
  np.testing.assert_array_equal(np.asarray(a.z_proj.kernel[...]),
                                tiny.z_proj.weight.detach().numpy().T)
  out = convert(tmp_path / 'w.pth', tmp_path / 'model')
  c = load_xar(out)
  x = jnp.ones((1, 256, 16))
  labels, tau = jnp.asarray([2]), jnp.asarray([[0, 100, 500, 999]])
  assert max_rel_error(c.forward_full(x, labels, tau), a.forward_full(x, labels, tau)) == 0.0
  torch.save({'model': tiny.state_dict(), 'model_ema': tiny.state_dict(), 'epoch': 3},
             tmp_path / 'train.pth')
  assert load_converted(tmp_path / 'train.pth').cfg == TINY


def edits(sd):
  k_lin = 'decoder_blocks.1.mlp.fc2.weight'
  yield 'missing', {k: v for k, v in sd.items() if k != k_lin}, 'missing'
  yield 'extra', {**sd, 'pred.extra.weight': np.ones(3, np.float32)}, 'unexpected'
  yield 'shape', {**sd, k_lin: sd[k_lin][:, :-1]}, 'shape'
  yield 'dtype', {**sd, k_lin: sd[k_lin].astype(np.int64)}, 'dtype'
  bad = sd[k_lin].copy()
  bad[0, 0] = np.nan
  yield 'nan', {**sd, k_lin: bad}, 'non-finite'
  yield 'mask', {**sd, 'mask': np.zeros_like(sd['mask'])}, 'buffer mask'
  cos = 'encoder_blocks.0.attn.rope.freqs_cos'
  raster = sd[cos].copy()
  raster[[64, 8]] = raster[[8, 64]]          # the unpermuted (raster) order of two rows
  yield 'rope order', {**sd, cos: raster}, f'buffer {cos}'
  yield 'no buffer', {k: v for k, v in sd.items()
                      if k != 'decoder_blocks.0.attn.rope.freqs_sin'}, 'missing buffer'
  yield 'classes', {k: v for k, v in sd.items() if k != 'class_emb.weight'}, 'class_emb'
  yield 'flowar', {**sd, 'flownet.input_proj.weight': np.ones((4, 16), np.float32)}, 'FlowAR'


@pytest.mark.parametrize('case', range(10))
def test_bad_checkpoints_fail_in_one_line_and_write_nothing(tiny, tmp_path, case):
  _, bad, words = list(edits(state_dict_np(tiny)))[case]
  check_bad_checkpoint(bad, words, convert_state=convert_state, convert=convert,
                       error=XARConversionError, tmp_path=tmp_path)


def test_not_a_file_existing_output_and_variant_mismatch(tiny, tmp_path):
  with pytest.raises(XARConversionError, match='does not exist'):
    convert(tmp_path / 'nope.pth', tmp_path / 'out')
  torch.save(tiny.state_dict(), tmp_path / 'w.pth')
  with pytest.raises(XARConversionError, match='not xAR-B'):
    convert(tmp_path / 'w.pth', tmp_path / 'out', variant='B')
  assert not (tmp_path / 'out').exists()
  (tmp_path / 'out').mkdir()
  with pytest.raises(UserError, match='already exists'):
    convert(tmp_path / 'w.pth', tmp_path / 'out')
