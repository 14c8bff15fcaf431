"""Harmon converter: round trip through .pth (torch.save of a flat state dict, read with
weights_only=True) and .safetensors, the variant read off the official full-size key listings
(shared/spec/harmon_state_dict_keys.txt, copied to tests/data), and strictness: every missing,
unexpected or mis-shaped key is an error and nothing is written."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')

from harmon_helpers import tiny_harmon  # noqa: E402

from disa_jax.convert.mapping import ConversionError, flax_state_to_torch  # noqa: E402
from disa_jax.errors import UserError  # noqa: E402
from disa_jax.systems.harmon.config import VARIANTS  # noqa: E402
from disa_jax.systems.harmon.convert import check, convert, infer_config, load_harmon  # noqa: E402

HEADS = dict(num_heads=14, mar_num_heads=4)


def official_shapes(data_dir, size):
  keys, on = {}, False
  for line in (data_dir / 'harmon_state_dict_keys.txt').read_text().splitlines():
    if line.startswith('## '):
      on = line.startswith(f'## FULL LIST Harmon-{size}:')
      continue
    if on and '\t' in line:
      k, shape = line.split('\t')
      keys[k] = tuple(int(x) for x in shape.strip('()').split(',') if x.strip())
  return keys


@pytest.mark.parametrize('size,variant,count', [
  ('0.5B', 'harmon_0_5b', 975),
  pytest.param('1.5B', 'harmon_1_5b', 1263, marks=pytest.mark.slow),   # abstract init ~60 s
])
def test_official_key_sets_give_the_variant(data_dir, size, variant, count):
  shapes = official_shapes(data_dir, size)
  assert len(shapes) == count
  cfg, name = check(shapes)
  assert name == variant and cfg == VARIANTS[variant]
  # Without vae.* and the tied head (the released .pth layout) it is the same model.
  bare = {k: v for k, v in shapes.items()
          if not k.startswith('vae.') and k != 'llm.lm_head.weight'}
  assert infer_config(bare) == (cfg, name)


def _torch_sd(model, extra=True):
  sd = {k: torch.as_tensor(np.array(v)) for k, v in
        flax_state_to_torch(nnx.state(model)).items()}
  if extra:
    sd['llm.lm_head.weight'] = sd['llm.model.embed_tokens.weight'].clone()
    sd['vae.decoder.conv_out.bias'] = torch.zeros(3)
  return sd


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_round_trip(tmp_path, fmt):
  model = tiny_harmon(seed=4)
  sd = _torch_sd(model)
  path = tmp_path / f'harmon.{fmt}'
  if fmt == 'pth':
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
  else:
    from safetensors.torch import save_file
    save_file(sd, str(path))
  out = convert(path, tmp_path / 'out', **HEADS)
  loaded = load_harmon(out)
  # Architecture equal; image_size (run-time, 512 by default) and attn_splits are not weights.
  assert loaded.config.llm == model.config.llm and loaded.config.image_size == 512
  assert loaded.config.mar == dataclasses.replace(model.config.mar, attn_splits=0)
  want = jax.tree.leaves(nnx.state(model, nnx.Param))
  got = jax.tree.leaves(nnx.state(loaded, nnx.Param))
  for a, b in zip(got, want, strict=True):
    ref = np.asarray(b)
    if fmt == 'pth':   # stored in bf16: exact bf16 rounding of the reference
      ref = np.asarray(jax.numpy.asarray(ref).astype(jax.numpy.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(a), ref)
  bf = convert(path, tmp_path / 'out16', dtype='bfloat16', **HEADS)
  m16 = load_harmon(bf)
  assert m16.config.dtype == 'bfloat16'
  assert m16.llm.model.embed_tokens.embedding.dtype == jax.numpy.bfloat16


@pytest.mark.parametrize('edit,needle', [
  ('drop', 'missing keys'),
  ('extra', 'unexpected keys'),
  ('shape', 'shape mismatches'),
  ('foreign', 'outside llm.'),
  ('lm_head', 'tied embedding'),
])
def test_strict(tmp_path, edit, needle):
  sd = _torch_sd(tiny_harmon(seed=5))
  if edit == 'drop':
    del sd['proj_out.2.bias']
  elif edit == 'extra':
    sd['mar.not_a_param'] = torch.zeros(3)
  elif edit == 'shape':
    sd['llm.model.layers.1.self_attn.v_proj.bias'] = torch.zeros(7)
  elif edit == 'foreign':
    sd['text_encoder.weight'] = torch.zeros(3)
  elif edit == 'lm_head':
    sd['llm.lm_head.weight'] = torch.zeros(5, 5)
  path = tmp_path / 'bad.pth'
  torch.save(sd, path)
  with pytest.raises(ConversionError, match=needle) as err:
    convert(path, tmp_path / 'out', **HEADS)
  assert isinstance(err.value, ValueError)
  assert not (tmp_path / 'out').exists()


def test_missing_file_and_unsafe_pickle(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    convert(tmp_path / 'nope.pth', tmp_path / 'out')

  class Evil:
    def __reduce__(self):
      return (print, ('pwned',))

  path = tmp_path / 'evil.pth'
  torch.save({'x': Evil()}, path)
  with pytest.raises(ValueError):
    convert(path, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
  assert issubclass(UserError, ValueError)
