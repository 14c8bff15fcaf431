"""D-AR configs and the end-to-end path on random weights (config -> models -> ids -> images)."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from disa_jax.errors import UserError
from disa_jax.systems.dar import Sampler, SamplingOptions, TokenizerRunner
from disa_jax.systems.dar.config import build_models, dar_config

ROOT = Path(__file__).resolve().parents[2]


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', ROOT / 'configs' / 'dar' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize('name,dim,layers', [('l', 1024, 24), ('xl', 1280, 36)])
def test_official_configs(name, dim, layers):
  c = load(name)
  assert c.system == 'dar'
  assert (c.model.gpt.dim, c.model.gpt.n_layer, c.model.gpt.vocab_size) == (dim, layers, 16384)
  assert (c.model.tokenizer.num_queries, c.model.tokenizer.num_groups) == (256, 8)
  assert (c.sampling.cfg, c.sampling.top_k, c.sampling.top_p, c.sampling.temperature) == (
    '1.2,8.0', 0, 1.0, 1.0)
  assert c.runtime.gpt_dtype == 'bfloat16'
  cpu = load(name, 'cpu')
  assert cpu.model.tokenizer.num_queries == 256 and cpu.model.gpt.dim == 128
  with pytest.raises(ValueError):
    load(name, 'large')
  with pytest.raises(UserError):
    dar_config('xxl')


def test_tiny_config_generates_images_end_to_end():
  c = load('l', 'tiny')
  gpt, tok = build_models(c)
  run = TokenizerRunner(tok)
  sampler = Sampler(gpt, run)
  out = sampler.generate([1, 2], key=jax.random.key(0), previews=True,
                         options=SamplingOptions(cfg=c.sampling.cfg))
  assert out.ids.shape == (2, 16) and out.images.shape == (2, 64, 64, 3)
  assert out.previews.shape == (4, 2, 64, 64, 3) and np.isfinite(out.images).all()
  early = sampler.generate([1, 2], key=jax.random.key(0), num_tokens=8,
                           options=SamplingOptions(cfg=c.sampling.cfg))
  np.testing.assert_array_equal(early.ids[:, :8], out.ids[:, :8])
  np.testing.assert_allclose(early.images, out.previews[1], rtol=1e-5, atol=1e-5)
  assert set(run.compiles) == {'conditions', 'step'} and run.compiles['step'] == 1


@pytest.mark.slow
def test_bench_small_runs_and_matches():
  pytest.importorskip('torch')
  from disa_jax.systems.dar.bench import main
  out = main(['--small', '--batch', '2'])
  assert out['gpt']['ids_equal'] and out['gpt']['compiles'] == {'prefill': 1, 'step': 1}
  assert out['decoder']['max_rel_error_vs_torch'] < 1e-4


def test_bf16_gpt_samples_valid_ids():
  """The official runs cast the GPT to bfloat16: the same loop runs with bf16 weights/cache."""
  c = load('xl', 'tiny')
  c.runtime.gpt_dtype = 'bfloat16'
  gpt, _ = build_models(c)
  assert gpt.tok_embeddings[...].dtype.name == 'bfloat16'
  ids = Sampler(gpt).generate([3, 4, 5], key=jax.random.key(1), decode=False).ids
  assert ids.shape == (3, 16) and ids.min() >= 0 and ids.max() < 64
  assert len(np.unique(ids)) > 4
