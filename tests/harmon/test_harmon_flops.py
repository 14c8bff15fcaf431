"""Harmon's plan and FLOP model against the spec's tables (shared/spec/harmon.md §5, App. A):
LLM segment lengths, DiSA step counts with the 950 clamp, and FLOPs per image by component."""

import pytest

from disa_jax.schedules import step_schedule
from disa_jax.systems.harmon.config import VARIANTS
from disa_jax.systems.harmon.flops import harmon_flops
from disa_jax.systems.mar.plan import make_plan


def plan_for(variant, steps, clip, enc_bucket=64):
  return make_plan(VARIANTS[variant].runtime_mar, batch_size=1, steps=steps, max_timestep=clip,
                   cfg=3.0, cfg_schedule='constant', enc_bucket=enc_bucket)


def test_schedule_matches_appendix_a():
  plan = plan_for('harmon_0_5b', [100] * 64, None)
  assert [s.n_pred for s in plan.steps][:8] == [1, 1, 1, 2, 3, 4, 4, 4]
  assert sum(64 + s.visible for s in plan.steps) == 27432          # LLM tokens per row
  assert {s.cfg for s in plan.steps} == {3.0}                       # constant CFG
  for upper, requested, actual in [(100, 3329, 3200), (50, 1733, 1681), (25, 929, 919)]:
    p = plan_for('harmon_0_5b', step_schedule('linear', 64, upper, 5), 950)
    assert sum(s.requested_steps for s in p.steps) == requested
    assert sum(s.actual_steps for s in p.steps) == actual
  # Bucketed static shapes: 17 encoder / LLM lengths at enc_bucket 64.
  assert len(plan.backbone_buckets) <= 17


@pytest.mark.parametrize('variant,enc,dec,head,head50', [
  ('harmon_0_5b', 10.6, 29.3, 14.6, 3.0),
  ('harmon_1_5b', 46.9, 125.2, 61.9, 12.6),
])
def test_flops_match_spec(variant, enc, dec, head, head50):
  f = harmon_flops(VARIANTS[variant], plan_for(variant, [100] * 64, None))
  t = {k: v / 1e12 for k, v in f.items()}
  assert t['encoder'] == pytest.approx(enc, rel=0.01)
  assert t['decoder'] == pytest.approx(dec, rel=0.01)
  assert t['head'] == pytest.approx(head, rel=0.01)
  # LLM: spec 39.3 / 143.8 T linear; attention here counts the full masked score matrix.
  assert t['llm'] > {'harmon_0_5b': 39.3, 'harmon_1_5b': 143.8}[variant]
  assert t['head'] / t['total'] == pytest.approx(0.155, abs=0.01)
  d = harmon_flops(VARIANTS[variant],
                   plan_for(variant, step_schedule('linear', 64, 50, 5), 950))
  assert d['head'] / 1e12 == pytest.approx(head50, rel=0.02)
  assert d['encoder'] == f['encoder'] and d['llm'] == f['llm']


def test_bench_settings():
  from disa_jax.systems.harmon.bench import bench_config, schedule

  assert schedule('baseline', 64) == ([100] * 64, None)
  steps, clip = schedule('disa_50_5', 64)
  assert clip == 950 and steps[0] == 50 and steps[-1] == 5
  c = bench_config('harmon_0_5b', image_size=256, vocab=4096, layers=4, mar_depth=2)
  assert c.llm.hidden_size == 896 and c.llm.num_attention_heads == 14
  assert c.llm.num_hidden_layers == 4 and c.mar.encoder_depth == c.mar.decoder_depth == 2
  assert c.mar.diffloss_w == 1024 and c.runtime_mar.seq_len == 256


def test_bench_single_pass_times_one_split_pass():
  """--single-pass (full-size images on a CPU): one phase-split generate per setting, whose wall
  time is the reported time; the default runs warm-up, fused and split passes."""
  import argparse

  from harmon_helpers import tiny_harmon

  from disa_jax.systems.harmon.bench import run_model
  from disa_jax.systems.harmon.sampler import HarmonSampler

  model = tiny_harmon(seed=1)
  sampler = HarmonSampler(model)
  calls, generate = [], sampler.generate

  def spy(*a, **k):
    calls.append(k.get('timed', False))
    return generate(*a, **k)

  sampler.generate = spy
  for single, want in ((True, [True, True]), (False, [False, False, True] * 2)):
    calls.clear()
    args = argparse.Namespace(batch=1, num_iter=2, settings=['baseline', 'disa_25_5'],
                              torch=False, torch_settings=[], threads=1, single_pass=single)
    out = run_model(model, sampler, args, variant='tiny')
    assert calls == want
    base, disa = out['settings']['baseline'], out['settings']['disa_25_5']
    assert base['steps_requested'] == 200 and disa['steps_requested'] == 30
    assert set(disa['jax_phase_s']) == {'encoder', 'llm', 'decoder', 'head'}
    if single:
      assert disa['jax_s'] == disa['jax_timed_s'] and base['compile_s'] > 0
