"""The bundled FlowAR and xAR digits models (`configs/{flowar,xar}/digits.py`): shipped with
verified checksums, loaded strictly by their configs, decoded as pixels, and sampling
recognisable digits with their official schedule and with DiSA."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO

from disa_jax import integrity
from disa_jax.data.digits import TOKEN_SCALE, load_split_uint8
from disa_jax.engine import runner
from disa_jax.eval.quality import get_quality_metric
from disa_jax.systems.base import system_of
from disa_jax.systems.flowar.config import digits_config as flowar_digits
from disa_jax.systems.xar.config import digits_config as xar_digits

CONFIGS = {'flowar': flowar_digits, 'xar': xar_digits}


def _config_file(system):
  spec = importlib.util.spec_from_file_location('cfg', REPO / 'configs' / system / 'digits.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config


@pytest.mark.parametrize('system', sorted(CONFIGS))
def test_config_file_checkpoint_and_recipe(system):
  c = CONFIGS[system]()
  assert _config_file(system)().to_dict() == c.to_dict()
  assert c.system == system and c.model.token_dim == 1 and c.model.class_num == 10
  assert c.tokenizer.kind == 'pixels' and c.tokenizer.scale == TOKEN_SCALE
  assert c.data.kind == 'digits' and c.train.ema_rate == 0.995
  assert c.train.num_steps == {'flowar': 1000, 'xar': 900}[system]
  meta = json.loads((Path(c.checkpoint) / 'meta.json').read_text())
  assert meta['step'] == c.train.num_steps and meta['weights'] == 'ema'   # the recipe's export
  files = integrity.verify_checksums(c.checkpoint)       # shipped, and not corrupted
  assert any(k.startswith('params/') for k in files)
  model, source = runner.build_model(c)                  # strict: config == checkpoint
  assert source == f'checkpoint {c.checkpoint}'
  with pytest.raises(Exception, match='config'):
    bad = c.copy_and_resolve_references()
    bad.model.heads = 2 * c.model.heads
    runner.build_model(bad)


@pytest.mark.parametrize('system', sorted(CONFIGS))
def test_pixel_decoder_inverts_the_training_tokens(system):
  c = CONFIGS[system]()
  model, _ = runner.build_model(c)
  dec = runner.build_decoder(c, model)
  x, _ = load_split_uint8('heldout')
  pixels = x[:4, ..., 0].astype(np.float32) / 255 * 2 - 1            # [4, 16, 16] in [-1, 1]
  tokens = pixels.reshape(4, 256, 1) * TOKEN_SCALE                   # row-major, as sampled
  np.testing.assert_array_equal(dec.decode(tokens), x[:4])


# Accuracy floors on 16 images (chance: 0.1). Measured on 100 images, seed 0 (docs/benchmarks.md):
# FlowAR (1000 training steps) 0.99 with both schedules, xAR (900 steps) 0.94 / 0.93.
FLOORS = {'flowar': 0.75, 'xar': 0.75}


@pytest.mark.parametrize('system', ['flowar', pytest.param('xar', marks=pytest.mark.slow)])
def test_bundled_model_samples_digits_with_both_schedules(system):
  c = CONFIGS[system]()
  model, _ = runner.build_model(c)
  dec = runner.build_decoder(c, model)
  sampler = runner.make_sampler(model, c, runner.make_mesh(c))
  labels = np.arange(16) % 10                            # a multiple of the 8 test devices
  quality = get_quality_metric('digits')
  s = c.sampling
  for preset, cfg in (('baseline', s.get('baseline_cfg', s.cfg)), ('disa', s.cfg)):
    sampling = s.copy_and_resolve_references()
    sampling.preset = preset
    plan = runner.step_plan(sampling, system_of(c))
    tokens = sampler.generate(labels, jax.random.key(0), steps=plan.steps, cfg=cfg,
                              image_ids=np.arange(16))
    got = quality.evaluate(dec.decode(tokens), labels)
    assert got["accuracy"] >= FLOORS[system], (preset, got)
