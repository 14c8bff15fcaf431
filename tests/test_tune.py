"""disa-tune: the distance, the selection, the schedule file, and the commands that read it."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO
from test_cli import run_cli

from disa_jax import tune as tn
from disa_jax.schedules import RunSpec

TINY = f'--config={REPO}/configs/mar/digits.py:tiny'


# ---------------------------------------------------------------------------------------------
# Distance

def test_gaussian_w2_values():
  a = np.array([[[-1.0, 0.0], [1.0, 0.0]]])             # mean (0, 0), std (sqrt 2, 0)
  b = np.array([[[2.0, 1.0], [4.0, 1.0], [3.0, 1.0]]])  # mean (3, 1), std (1, 0)
  # [(0-3)^2 + (sqrt2-1)^2 + (0-1)^2 + 0] / 2 conditions*dims
  expect = (9 + (np.sqrt(2) - 1) ** 2 + 1) / 2
  assert tn.gaussian_w2(a, b) == pytest.approx(expect, rel=1e-12)
  assert tn.gaussian_w2(a, a) == 0.0
  assert tn.gaussian_w2(a, b) == pytest.approx(tn.gaussian_w2(b, a))


def test_gaussian_w2_bad_shapes():
  with pytest.raises(ValueError, match='M>=2'):
    tn.gaussian_w2(np.zeros((3, 1, 2)), np.zeros((3, 1, 2)))
  with pytest.raises(ValueError, match='differ'):
    tn.gaussian_w2(np.zeros((3, 4, 2)), np.zeros((2, 4, 2)))


def test_distance_sees_the_distribution_not_the_noise():
  """Two draws of the same per-condition distributions sit at the floor; a too-wide sampler
  (what few DDPM steps give) and a shifted one sit well above it, while a per-sample distance
  with shared noise cannot tell the wide sampler from an independent exact draw."""
  rng = np.random.default_rng(0)
  r, m, c = 400, 16, 4
  mu = rng.normal(size=(r, 1, c))
  sd = 0.3 + rng.random((r, 1, c))
  ref1 = mu + sd * rng.normal(size=(r, m, c))
  ref2 = mu + sd * rng.normal(size=(r, m, c))
  floor = tn.gaussian_w2(ref1, ref2)
  noise = rng.normal(size=(r, m, c))
  exact = mu + sd * noise
  wide = mu + 1.3 * sd * noise
  shifted = mu + 0.5 + sd * rng.normal(size=(r, m, c))
  assert tn.gaussian_w2(exact, ref1) < 1.3 * floor
  assert tn.gaussian_w2(wide, ref1) > 1.5 * floor
  assert tn.gaussian_w2(shifted, ref1) > 2.0 * floor
  # per-sample distance against a reference with the same noise: the exact draw is 0 but an
  # independent exact draw (ref2 vs ref1) scores 2*sd^2, more than the wrong `wide` sampler
  per_sample = lambda a, b: np.mean((a - b) ** 2)  # noqa: E731
  ref_shared = mu + sd * noise
  assert per_sample(ref2, ref1) > per_sample(wide, ref_shared)


# ---------------------------------------------------------------------------------------------
# Selection

def test_choose_fewest_steps_within_budget():
  c = tn.choose_steps({1: 5.0, 2: 1.05, 4: 0.9, 8: 1.0}, floor=1.0, budget=0.1)
  assert (c.steps, c.within_budget) == (2, True)
  assert tn.choose_steps({1: 5.0, 2: 1.05, 4: 0.9, 8: 1.0}, 1.0, 0.0).steps == 4
  assert tn.choose_steps({1: 5.0, 2: 1.05, 4: 0.9, 8: 1.0}, 1.0, 4.0).steps == 1


def test_choose_ignores_a_noisy_dip_below_a_failing_count():
  # 2 passes but 4 does not: the run of passing counts starts above the failure
  c = tn.choose_steps({1: 3.0, 2: 1.0, 4: 1.5, 8: 1.0, 16: 1.05}, floor=1.0, budget=0.1)
  assert c.steps == 8 and c.within_budget


def test_choose_over_budget_takes_the_largest():
  c = tn.choose_steps({1: 9.0, 5: 4.0, 10: 2.0}, floor=1.0, budget=0.5)
  assert (c.steps, c.within_budget) == (10, False)


def test_choose_bad_budget():
  with pytest.raises(tn.TuneError, match='--budget'):
    tn.choose_steps({1: 1.0}, 1.0, -0.1)
  with pytest.raises(tn.TuneError, match='--budget'):
    tn.choose_steps({1: 1.0}, 1.0, float('nan'))


def test_select_schedule_per_stage():
  measured = {'floor': [1.0, 2.0, 0.5],
              'distances': {1: [9.0, 2.1, 0.5], 4: [1.0, 2.0, 0.5], 8: [1.0, 2.0, 0.4]}}
  steps, choices = tn.select_schedule(measured, 0.1)
  assert steps == [4, 1, 1]
  assert [c.floor for c in choices] == [1.0, 2.0, 0.5]


def test_check_candidates():
  assert tn.check_candidates([8, 2, 2, 4], 50) == [2, 4, 8]
  with pytest.raises(tn.TuneError, match='exceeds --reference_steps=10'):
    tn.check_candidates([5, 20], 10)
  with pytest.raises(tn.TuneError, match='out of range'):
    tn.check_candidates([0, 5], 10)


# ---------------------------------------------------------------------------------------------
# Schedule file

def test_schedule_round_trip(tmp_path):
  path = str(tmp_path / 'tuned.json')
  s = tn.Schedule((12, 8, 4, 1), 950, 'mar', {'budget': 0.1, 'floor': [0.1, 0.2, 0.3, 0.4]})
  tn.save_schedule(path, s)
  assert os.listdir(tmp_path) == ['tuned.json']         # no temporary left behind
  back = tn.load_schedule(path, num_iter=4, system='mar')
  assert back == s
  assert back.step_plan().steps == (12, 8, 4, 1) and back.step_plan().max_timestep == 950
  with pytest.raises(tn.TuneError, match='already exists; pass --overwrite'):
    tn.save_schedule(path, s)
  tn.save_schedule(path, tn.Schedule((3,), None), overwrite=True)
  assert tn.load_schedule(path).max_timestep is None


def _write(tmp_path, obj, raw=None):
  p = tmp_path / 'bad.json'
  p.write_text(raw if raw is not None else json.dumps(obj))
  return str(p)


GOOD = {'format': 'disa-tune-schedule', 'version': 1, 'system': 'mar', 'num_iter': 2,
        'steps': [5, 3], 'max_timestep': 950}


@pytest.mark.parametrize('obj,raw,message', [
  (None, '{not json', 'is not a readable JSON schedule'),
  ([1, 2], None, 'is not a disa-tune-schedule file'),
  ({**GOOD, 'version': 7}, None, 'has version 7'),
  ({**GOOD, 'steps': []}, None, 'non-empty list of integers'),
  ({**GOOD, 'steps': [5, 2.5]}, None, 'non-empty list of integers'),
  ({**GOOD, 'steps': [5, 0]}, None, 'step count 0 is out of range'),
  ({**GOOD, 'num_iter': 3}, None, '"num_iter" is 3 but "steps" has 2'),
  ({**GOOD, 'max_timestep': 1000}, None, '"max_timestep" must be null or an integer'),
  ({**GOOD, 'system': 'flowar'}, None, "tuned for system 'flowar', not 'mar'"),
])
def test_bad_schedule_files(tmp_path, obj, raw, message):
  path = _write(tmp_path, obj, raw)
  with pytest.raises(tn.TuneError) as e:
    tn.load_schedule(path, system='mar')
  assert message in str(e.value) and path in str(e.value) and '\n' not in str(e.value)


def test_missing_schedule_and_num_iter_mismatch(tmp_path):
  with pytest.raises(tn.TuneError, match='does not exist'):
    tn.load_schedule(str(tmp_path / 'nope.json'))
  path = _write(tmp_path, GOOD)
  with pytest.raises(tn.TuneError, match='has 2 AR stages but num_iter is 4'):
    tn.load_schedule(path, num_iter=4)


def test_run_spec_reads_a_schedule_file(tmp_path):
  path = _write(tmp_path, {**GOOD, 'steps': [9, 4]})
  spec = RunSpec.parse(f'tuned=file:{path}')
  assert (spec.label, spec.num_iter, spec.upper, spec.lower) == ('tuned', 2, 9, 4)
  assert spec.family == 'tuned (disa-tune)'
  plan = spec.step_plan()
  assert plan.steps == (9, 4) and plan.max_timestep == 950


# ---------------------------------------------------------------------------------------------
# Measurement on a tiny MAR, and the commands

def test_measure_mar_tiny():
  from disa_jax.systems.base import system_of
  from disa_jax.systems.mar.sampling import Sampler
  from disa_jax.systems.mar.variants import digits_config

  config = digits_config(tiny=True)
  model, _ = system_of(config).build_model(config, seed=0)
  sampler = Sampler(model)
  labels = np.array([1, 2], np.int32)
  kw = dict(num_iter=4, max_timestep=950, cfg=2.0, cfg_schedule='linear', temperature=1.0,
            reference_steps=6, candidates=(1, 6), draws=4)
  m = tn.measure_mar(sampler, labels, jax.random.key(0), **kw)
  assert sum(m['conditions']) == 2 * model.config.seq_len and len(m['floor']) == 4
  assert sorted(m['distances']) == [1, 6]
  assert all(np.isfinite(m['floor'])) and min(m['floor']) > 0
  again = tn.measure_mar(sampler, labels, jax.random.key(0), **kw)
  assert again['distances'][1] == m['distances'][1]          # deterministic in the key


@pytest.mark.slow
def test_tune_then_sample_with_steps_file(tmp_path):
  out = tmp_path / 'tuned.json'
  r = run_cli(TINY, '--num-iter=4', '--probe-images=2', '--draws=3', '--reference-steps=6',
              '--candidates=1,3,6', '--budget=0.5', f'--out={out}', tool='tune')
  assert r.returncode == 0, r.stderr
  data = json.loads(out.read_text())
  assert data['num_iter'] == 4 and data['max_timestep'] == 950
  assert all(s in (1, 3, 6) for s in data['steps'])
  assert set(data['distances']) == {'1', '3', '6'} and len(data['floor']) == 4
  # a second run refuses to replace the file
  r = run_cli(TINY, '--num-iter=4', f'--out={out}', tool='tune')
  assert r.returncode == 2 and 'already exists; pass --overwrite' in r.stderr

  steps = [6, 3, 3, 1]
  tn.save_schedule(str(out), tn.Schedule(tuple(steps), 950), overwrite=True)
  sample_out = tmp_path / 'sample'
  r = run_cli(TINY, '--num-images=2', '--batch-size=2', f'--steps-file={out}',
              f'--out={sample_out}')
  assert r.returncode == 0, r.stderr
  m = json.loads((sample_out / 'metrics.json').read_text())
  assert m['steps_requested'] == steps and m['num_iter'] == 4 and m['max_timestep'] == 950


@pytest.mark.parametrize('extra,content,message', [
  ([], '{"format": "x"}', 'is not a disa-tune-schedule file'),
  (['--num-iter=3'], json.dumps(GOOD), 'has 2 AR stages but num_iter is 3'),
  (['--steps=4,4'], json.dumps(GOOD), '--steps and --steps_file both'),
  (['--max-timestep=-1'], json.dumps(GOOD), 'contradicts the clamp 950'),
])
def test_sample_bad_steps_file_one_line(tmp_path, extra, content, message):
  path = tmp_path / 'steps.json'
  path.write_text(content)
  r = run_cli(TINY, '--num-images=1', f'--steps-file={path}', *extra,
              f'--out={tmp_path / "o"}')
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert not (tmp_path / 'o').exists()


def test_tune_bad_inputs(tmp_path):
  r = run_cli(TINY, '--candidates=2,80', '--reference-steps=50', f'--out={tmp_path / "t.json"}',
              tool='tune')
  assert r.returncode == 2 and 'candidate 80 exceeds --reference_steps=50' in r.stderr
  r = run_cli(TINY, '--budget=-1', f'--out={tmp_path / "t.json"}', tool='tune')
  assert r.returncode == 2 and '--budget must be a finite number >= 0' in r.stderr
  r = run_cli(TINY, f'--out={tmp_path}', tool='tune')
  assert r.returncode == 2 and 'is a directory' in r.stderr
  assert os.listdir(tmp_path) == []


def test_reselect_from_measured_file(tmp_path):
  from disa_jax.cli.tune import reselect

  src = tmp_path / 'm.json'
  info = {'floor': [1.0, 1.0], 'distances': {'1': [5.0, 1.4], '4': [1.0, 1.0]}, 'budget': 0.1}
  tn.save_schedule(str(src), tn.Schedule((4, 4), 950, 'mar', info))
  data = reselect(str(src), str(tmp_path / 'b.json'), budget=0.5)
  assert data['steps'] == [4, 1] and data['budget'] == 0.5 and data['max_timestep'] == 950
  assert tn.load_schedule(str(tmp_path / 'b.json')).steps == (4, 1)
  bare = tmp_path / 'bare.json'
  tn.save_schedule(str(bare), tn.Schedule((4, 4), 950))
  with pytest.raises(tn.TuneError, match='no complete "floor" / "distances"'):
    reselect(str(bare), str(tmp_path / 'c.json'), budget=0.5)
