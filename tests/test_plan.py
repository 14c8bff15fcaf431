"""AR mask schedule, linear CFG and the bucket planner (compile bounds, padding waste)."""

import csv

import numpy as np
import pytest

from disa_jax.config import MAR_VARIANTS
from disa_jax.schedules import resolve_steps, step_schedule
from disa_jax.systems.mar.flops import backbone_flops, plan_flops
from disa_jax.systems.mar.model import MARConfig
from disa_jax.systems.mar.plan import make_plan, mask_schedule

BASE = MARConfig.from_dict(MAR_VARIANTS['mar_base'])


def test_k64_tokens_masks_and_cfg_match_table(data_dir):
  rows = [r for r in (data_dir / 'mar_disa_k64_schedule.csv').read_text().splitlines()
          if not r.startswith('#')]
  table = list(csv.DictReader(rows))
  plan = make_plan(BASE, batch_size=1, steps=step_schedule('linear', 64, 50, 5),
                   max_timestep=950, cfg=2.0)
  for row, st in zip(table, plan.steps, strict=True):
    assert st.m_cur == int(row['masked_before'])
    assert st.n_pred == int(row['n_pred'])
    assert st.m_next == int(row['m_after'])
    np.testing.assert_allclose(st.cfg - 1.0, float(row['cfg_frac']), atol=1e-6)  # cfg 2


def test_tokens_per_step_known_k():
  n = lambda k: [s[2] for s in mask_schedule(k, 256)]  # noqa: E731
  assert n(256) == [1] * 256
  assert n(32)[:10] == [1, 1, 1, 2, 3, 4, 3, 5, 5, 6]
  assert n(32)[-10:] == [11, 12, 11, 12, 12, 13, 12, 12, 13, 12]
  assert n(16) == [2, 3, 7, 8, 11, 13, 15, 16, 19, 20, 22, 23, 23, 25, 24, 25]
  for k in (1, 2, 7, 64, 100, 256):
    assert sum(n(k)) == 256 and min(n(k)) >= 1


def test_num_iter_out_of_range():
  with pytest.raises(ValueError, match=r'num_iter must be in \[1, 256\]'):
    mask_schedule(257, 256)
  with pytest.raises(ValueError, match='num_iter'):
    mask_schedule(0, 256)


@pytest.mark.parametrize('preset,k,upper', [('mar', 64, 100), ('mar', 256, 100),
                                            ('disa', 64, 50), ('disa', 32, 50),
                                            ('disa', 256, 50)])
def test_buckets_bounded_and_waste_small(preset, k, upper):
  sp = resolve_steps(num_iter=k, preset=preset, upper=upper, lower=5)
  plan = make_plan(BASE, batch_size=8, steps=sp.steps, max_timestep=sp.max_timestep, cfg=2.9,
                   enc_bucket=16, max_head_waste=0.05)
  assert plan.head_waste() <= 0.05 + 1e-9
  assert plan.encoder_waste() < 0.1
  # Head compiles: at most one per distinct (step count, token count); backbone: one per
  # encoder length bucket (<= 256 / 16 + 1).
  assert len(plan.head_buckets) <= len({(s.actual_steps, s.n_pred) for s in plan.steps})
  assert len(plan.backbone_buckets) <= 17
  for s in plan.steps:
    assert s.n_pad >= s.n_pred and s.visible_pad >= s.visible
    assert s.visible_pad % 16 == 0 or s.visible_pad == 256


def test_row_grouping_respects_budget():
  sp = resolve_steps(num_iter=64, preset='mar', upper=100)
  loose = make_plan(BASE, batch_size=1, steps=sp.steps, max_timestep=None, cfg=1.0,
                    max_head_waste=0.5)
  exact = make_plan(BASE, batch_size=1, steps=sp.steps, max_timestep=None, cfg=1.0,
                    max_head_waste=0.0)
  assert exact.head_waste() == 0 and len(exact.head_buckets) == 7   # n = 1..7
  assert len(loose.head_buckets) < 7 and 0 < loose.head_waste() <= 0.5


def test_flop_model():
  # Spec: ~11.0 TFLOP backbone per MAR-B image at K=64 with CFG (encoder on visible tokens),
  # ~14.9 when the encoder runs on all 320 positions; head ~71 MFLOP per evaluation.
  sp = resolve_steps(num_iter=64, preset='disa', upper=50, lower=5)
  plan = make_plan(BASE, batch_size=1, steps=sp.steps, max_timestep=950, cfg=2.9)
  fl = plan_flops(BASE, plan)
  assert 10.5e12 < fl['backbone'] < 11.5e12
  full = 2 * sum(backbone_flops(BASE, 256) for _ in range(64))
  assert 14.4e12 < full < 15.4e12
  assert 0.7e12 < fl['head'] < 0.8e12
  mar = resolve_steps(num_iter=64, preset='mar', upper=100)
  fl_mar = plan_flops(BASE, make_plan(BASE, batch_size=1, steps=mar.steps, max_timestep=None,
                                      cfg=2.9))
  assert 3.5e12 < fl_mar['head'] < 3.8e12
