"""Golden values of the xAR spec (`flowar_xar.md` §1, §5, §6): per-cell DiSA step formula and
presets, the Euler-Maruyama grid (tau per step, dt), the cell-major order, RoPE table and mask
against the reference's buffers, the CFG ramp, and the configs."""

import importlib.util

import numpy as np
import pytest
import torch

from disa_jax.errors import UserError
from disa_jax.systems.xar.config import TINY, VARIANTS
from disa_jax.systems.xar.model import cell_causal_mask, cell_order, cell_rope_table
from disa_jax.systems.xar.sampling import cell_cfg, cell_plan, first_pass_mask
from disa_jax.systems.xar.steps import disa_cell_steps, preset_steps, resolve_cell_steps
from reference.xar import XARRef

GOLDEN_TAU = {   # spec §6.3
  15: '1000 931 862 794 725 657 588 520 451 382 314 245 177 108 40',
  26: '1000 961 923 884 846 808 769 731 692 654 616 577 539 500 462 424 385 347 308 270 232 193 '
      '155 116 78 40',
  38: '1000 974 948 922 896 870 844 818 792 766 740 714 688 662 636 610 584 558 532 507 481 455 '
      '429 403 377 351 325 299 273 247 221 195 169 143 117 91 65 40',
  40: '1000 975 950 926 901 876 852 827 803 778 753 729 704 680 655 630 606 581 556 532 507 483 '
      '458 433 409 384 360 335 310 286 261 236 212 187 163 138 113 89 64 40',
  50: '1000 980 960 941 921 902 882 862 843 823 804 784 764 745 725 706 686 666 647 627 608 588 '
      '568 549 529 510 490 471 451 431 412 392 373 353 333 314 294 275 255 235 216 196 177 157 '
      '137 118 98 79 59 40',
}
GOLDEN_DT = {50: -0.0195918367, 38: -0.0259459459, 26: -0.0384, 15: -0.0685714286,
             40: -0.0246153846}


@pytest.mark.parametrize('n', sorted(GOLDEN_TAU))
def test_golden_tau_and_dt(n):
  plan = cell_plan(n)
  assert plan.tau.tolist() == [int(x) for x in GOLDEN_TAU[n].split()]
  np.testing.assert_allclose(plan.dt[:-1], GOLDEN_DT[n], rtol=1e-6)
  assert plan.dt[-1] == np.float32(-0.04)
  assert plan.noise_scale[-1] == 0.0 and np.all(plan.noise_scale[:-1] > 0)
  np.testing.assert_allclose(plan.noise_scale[0], np.sqrt(2.0) * np.sqrt(-GOLDEN_DT[n]),
                             rtol=1e-6)


def test_step_formula_presets_and_strategies():
  assert disa_cell_steps(50, 15) == [50, 38, 26, 15]
  assert disa_cell_steps(50, 10) == [50, 36, 23, 10]
  assert preset_steps('baseline', 'B') == [40] * 4
  assert preset_steps('baseline', 'xAR-L') == preset_steps('baseline', 'H') == [50] * 4
  assert preset_steps('disa', 'H') == [50, 38, 26, 15]
  assert resolve_cell_steps(variant='B', preset='disa') == [50, 38, 26, 15]
  assert resolve_cell_steps(variant='B', preset='baseline', baseline=30) == [30] * 4
  assert resolve_cell_steps(variant='B', strategy='constant', upper=20, lower=10) == [10] * 4
  assert resolve_cell_steps(variant='B', strategy='two-stage', upper=20, lower=10) == \
    [20, 20, 10, 10]
  assert resolve_cell_steps(variant='B', steps='40,30,20,10') == [40, 30, 20, 10]
  assert resolve_cell_steps(variant='B', steps=12) == [12] * 4


@pytest.mark.parametrize('kwargs, words', [
  (dict(steps='40,30'), 'entries'),
  (dict(steps='40,30,20,2'), 'at least 3'),
  (dict(preset='disa', upper=10, lower=20), 'upper steps'),
  (dict(preset='fast'), 'unknown xAR step preset'),
])
def test_bad_schedules_are_one_line_user_errors(kwargs, words):
  with pytest.raises(UserError, match=words) as e:
    resolve_cell_steps(variant='B', **kwargs)
  assert '\n' not in str(e.value)


def test_cfg_ramp():
  assert [cell_cfg(2.7, s) for s in range(4)] == pytest.approx([1.0, 1 + 1.7 / 3,
                                                                1 + 3.4 / 3, 2.7])
  assert cell_cfg(2.7, 0) == 1.0


def test_cell_order_rope_and_mask_match_the_reference_buffers():
  order = cell_order(TINY)
  assert order[:3].tolist() == [0, 1, 2] and order[8] == 16 and order[64] == 8
  assert order[128] == 128 and order[192] == 136 and sorted(order.tolist()) == list(range(256))
  ref = XARRef(width=64, encoder_depth=1, decoder_depth=1, heads=2, class_num=10)
  cos, sin = cell_rope_table(TINY)
  np.testing.assert_allclose(cos, ref.encoder_blocks[0].attn.rope.freqs_cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(sin, ref.encoder_blocks[0].attn.rope.freqs_sin.numpy(), atol=1e-6)
  mask = cell_causal_mask(TINY)
  assert np.array_equal(np.where(mask, 0.0, -np.inf), ref.mask[0, 0].numpy())
  fp = first_pass_mask(64, 2)           # queries cells 1, 2; keys cells 0..2
  assert fp.shape == (128, 192)
  assert fp[:64, :128].all() and not fp[:64, 128:].any() and fp[64:].all()
  assert np.array_equal(fp, mask[64:192, :192])
  assert torch.equal(ref.mask[0, 0, 64:192, :192] == 0, torch.from_numpy(fp))


@pytest.mark.parametrize('name', ['b', 'l', 'h'])
def test_configs(name):
  spec = importlib.util.spec_from_file_location(f'xar_{name}', f'configs/xar/{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  key = name.upper()
  assert c.system == 'xar' and c.variant == key
  assert c.model.width == VARIANTS[key].width
  assert c.sampling.cfg == {'B': 2.7, 'L': 2.3, 'H': 2.2}[key]
  assert (c.sampling.upper_steps, c.sampling.lower_steps) == (50, 15)
  assert c.sampling.baseline_steps == {'B': 40, 'L': 50, 'H': 50}[key]
  tiny = mod.get_config('tiny')
  assert tiny.model.width == TINY.width and tiny.tokenizer.kind == 'none'
  assert mod.get_config('cpu').model.width == 128
  with pytest.raises(UserError, match='unknown xAR config argument'):
    mod.get_config('gpu')
