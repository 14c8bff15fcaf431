"""Strict D-AR converters: official key tables (from the spec's listing of the released
architectures), embedded official config, safetensors, refusal with nothing written."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import dar_helpers as h  # noqa: E402
from flax import nnx  # noqa: E402

from disa_jax.errors import UserError  # noqa: E402
from disa_jax.systems.dar import (  # noqa: E402
  GPT,
  GPTConfig,
  Tokenizer,
  TokenizerConfig,
  convert_gpt,
  convert_tokenizer,
  load_gpt,
  load_tokenizer,
)
from disa_jax.systems.dar.convert import (  # noqa: E402
  GPT_DROP,
  TOKENIZER_DROP,
  DarConversionError,
  check_shapes,
  gpt_key_table,
  infer_gpt_config,
  infer_tokenizer_config,
  to_torch_state_dict,
  tokenizer_key_table,
)

KEYS = Path(__file__).parent / 'data' / 'd_ar_state_dict_keys.txt'


def official_shapes(section: str) -> dict[str, tuple]:
  out, on = {}, False
  for line in KEYS.read_text().splitlines():
    if line.startswith('## '):
      on = line.startswith(f'## {section} ')
      continue
    if on and line and not line.startswith('#'):
      key, shape = line.split('\t')[:2]
      out[key] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
  assert out, section
  return out


def _flat(module_factory):
  abstract = nnx.eval_shape(module_factory)
  return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def test_official_tokenizer_keys_and_shapes_are_covered_exactly():
  shapes = official_shapes('tokenizer_v1')
  assert len(shapes) == 830
  cfg = infer_tokenizer_config(shapes)
  assert cfg == TokenizerConfig()
  check_shapes(shapes, tokenizer_key_table(cfg), _flat(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0))),
               TOKENIZER_DROP, 'tokenizer')
  assert len(tokenizer_key_table(cfg)) == 830 - 7


@pytest.mark.parametrize('section,variant,params', [('GPT-L', 'l', 342_910_976),
                                                    ('GPT-XL', 'xl', 774_699_520)])
def test_official_gpt_keys_and_shapes_are_covered_exactly(section, variant, params):
  shapes = official_shapes(section)
  cfg = infer_gpt_config(shapes)
  assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.hidden) == (
    {'l': (1024, 24, 16, 2816), 'xl': (1280, 36, 20, 3584)}[variant])
  flat = _flat(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  check_shapes(shapes, gpt_key_table(cfg), flat, GPT_DROP, 'GPT')
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == params


def test_round_trip_back_to_torch_layout():
  ref_model, run, _ = h.tokenizer_pair()
  model = nnx.merge(run.graphdef, run.state)
  back = to_torch_state_dict(model, tokenizer_key_table(model.cfg))
  sd = ref_model.state_dict()
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
  tm, gm, _ = h.gpt_pair()
  sd = tm.state_dict()
  for k, v in to_torch_state_dict(gm, gpt_key_table(gm.cfg)).items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def _saved_tokenizer(tmp_path, mutate):
  ref_model, _, _ = h.tokenizer_pair()
  sd = dict(ref_model.state_dict())
  mutate(sd)
  path = tmp_path / 'tok.pth'
  torch.save({'model': sd}, path)
  return path


@pytest.mark.parametrize('mutate,message', [
  (lambda sd: sd.pop('decoder_layers.1.attention.k_norm.bias'), 'missing keys'),
  (lambda sd: sd.__setitem__('encoder_layers.0.extra', torch.zeros(3)), 'unexpected keys'),
  (lambda sd: sd.__setitem__('quant_out_conv.weight', torch.zeros(64, 4, 1, 1)),
   'shape mismatches'),
])
def test_strict_tokenizer_conversion_writes_nothing_on_failure(tmp_path, mutate, message):
  path = _saved_tokenizer(tmp_path, mutate)
  with pytest.raises(DarConversionError, match=message) as e:
    convert_tokenizer(path, tmp_path / 'out', settings=h.SETTINGS)
  assert isinstance(e.value, UserError)
  assert not (tmp_path / 'out').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['tok.pth']


def test_gpt_conversion_refuses_missing_layer_and_wrong_file(tmp_path):
  tm, _, _ = h.gpt_pair()
  sd = dict(tm.state_dict())
  sd.pop('layers.1.feed_forward.w3.weight')
  torch.save({'model': sd}, tmp_path / 'gpt.pth')
  with pytest.raises(DarConversionError, match='w3'):
    convert_gpt(tmp_path / 'gpt.pth', tmp_path / 'out')
  _, _, tok_path = h.tokenizer_pair()
  with pytest.raises(DarConversionError, match='holds a D-AR tokenizer'):
    convert_gpt(tok_path, tmp_path / 'out')
  with pytest.raises(UserError, match='does not exist'):
    convert_gpt(tmp_path / 'nope.pt', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_embedded_official_config_object_is_read_safely(tmp_path, monkeypatch):
  """The released tokenizer file pickles a config_util.Config; it is read through a stub (no
  arbitrary code runs) and its settings replace the defaults."""
  mod = types.ModuleType('config_util')

  class Config:
    def __init__(self, data):
      self._data = data

  Config.__module__ = 'config_util'
  Config.__qualname__ = 'Config'
  mod.Config = Config
  monkeypatch.setitem(sys.modules, 'config_util', mod)
  ref_model, run, _ = h.tokenizer_pair()
  model_cfg = {'num_all_queries': 16, 'num_query_groups': 4, 'queries_per_step': 4,
               'num_denoising_steps': 4, 'sampling_resolution': 64,
               'diff_decoder': {'data_std': 0.6, 'time_shift': 2}}
  torch.save({'ema': ref_model.state_dict(), 'model': {}, 'config': Config({'model': model_cfg})},
             tmp_path / 'tok.pt')
  monkeypatch.delitem(sys.modules, 'config_util')
  out = convert_tokenizer(tmp_path / 'tok.pt', tmp_path / 'conv')
  model = load_tokenizer(out)
  assert model.cfg == run.cfg
  x, _ = h.images(1, seed=9)
  from disa_jax.systems.dar import TokenizerRunner
  np.testing.assert_array_equal(TokenizerRunner(model).encode(x), run.encode(x))


def test_safetensors_and_bf16_gpt(tmp_path):
  from safetensors.numpy import save_file
  tm, gm, _ = h.gpt_pair()
  save_file({k: v.numpy() for k, v in tm.state_dict().items()}, tmp_path / 'gpt.safetensors')
  out = convert_gpt(tmp_path / 'gpt.safetensors', tmp_path / 'conv',
                    settings={'block_size': h.TINY_GPT['block_size']})
  assert load_gpt(out).cfg == gm.cfg
  bf = load_gpt(out, dtype='bfloat16')
  assert bf.cfg.dtype == 'bfloat16' and bf.output.kernel[...].dtype.name == 'bfloat16'
  with pytest.raises(DarConversionError, match='already exists'):
    convert_gpt(tmp_path / 'gpt.safetensors', tmp_path / 'conv')
  with pytest.raises(UserError, match='not'):
    load_tokenizer(out)


def test_gpt_config_variants():
  from disa_jax.systems.dar import GPT_VARIANTS
  assert GPTConfig(**GPT_VARIANTS['xl']).hidden == 3584
  with pytest.raises(UserError):
    GPTConfig(dim=100, n_head=2)


def test_other_pickled_objects_are_refused(tmp_path, monkeypatch):
  mod = types.ModuleType('evil_module')

  class Payload:
    pass

  Payload.__module__, Payload.__qualname__ = 'evil_module', 'Payload'
  mod.Payload = Payload
  monkeypatch.setitem(sys.modules, 'evil_module', mod)
  tm, _, _ = h.gpt_pair()
  torch.save({'model': tm.state_dict(), 'args': Payload()}, tmp_path / 'gpt.pt')
  with pytest.raises(DarConversionError, match='refusing to unpickle'):
    convert_gpt(tmp_path / 'gpt.pt', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
