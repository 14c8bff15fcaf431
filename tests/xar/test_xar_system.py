"""xAR as a `System`: found by name, stage plans from configs, validation, FLOPs, and
`disa-sample` / `disa-convert xar` end to end on the tiny config (subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from xar_testlib import torch_model

from disa_jax.errors import UserError
from disa_jax.systems.base import get_system
from disa_jax.systems.xar.config import xar_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_system_hooks():
  system = get_system('xar')
  assert system.name == 'xar' and system.converter == 'disa_jax.systems.xar.convert'
  c = xar_config('B')
  assert system.stage_plan(c.sampling).steps == (50, 38, 26, 15)
  with c.unlocked():
    c.sampling.preset = 'baseline'
  assert system.stage_plan(c.sampling).steps == (40,) * 4
  f = system.flops(c.model, system.stage_plan(c.sampling))
  assert f['evaluations'] == 160 and f['tokens'] == 10_432
  labels = system.conditions(xar_config('B', 'tiny'), 5)
  assert labels.tolist() == [0, 1, 2, 3, 4] and system.condition_count(c) == 1000


@pytest.mark.parametrize('field, value, words', [
  ('num_iter', 8, 'num_iter must be 4'),
  ('cfg_schedule', 'constant', 'cfg_schedule must be linear'),
  ('temperature', 0.5, 'no temperature'),
  ('steps', '10,2,2,2', 'at least 3'),
])
def test_validate_rejects_what_xar_cannot_run(field, value, words):
  c = xar_config('L', 'tiny')
  with c.unlocked():
    c.sampling[field] = value
  with pytest.raises(UserError, match=words):
    get_system('xar').validate(c)


def _run(*args, tool='disa_jax.cli.sample'):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', tool, *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=900)


def test_convert_cli(tmp_path):
  tm = torch_model(seed=5)
  torch.save(tm.state_dict(), tmp_path / 'xAR-tiny.pth')
  r = _run('xar', f'--torch-checkpoint={tmp_path / "xAR-tiny.pth"}', f'--out={tmp_path / "m"}',
           tool='disa_jax.convert.cli')
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / 'm' / 'meta.json').read_text())['kind'] == 'xar'
  r = _run('xar', f'--torch-checkpoint={tmp_path / "xAR-tiny.pth"}', f'--out={tmp_path / "n"}',
           '--variant=base', tool='disa_jax.convert.cli')
  assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'not xAR-BASE' in r.stderr
  assert not (tmp_path / 'n').exists()


@pytest.mark.slow
def test_sample_cli_tiny(tmp_path):
  out = tmp_path / 'out'
  r = _run('--config=configs/xar/b.py:tiny', '--num-images=3', '--batch-size=2',
           '--classes=3,7', f'--out={out}', '--noprogress')
  assert r.returncode == 0, r.stderr
  assert 'RANDOM WEIGHTS' in r.stdout
  assert sorted(os.listdir(out)) == ['.disa_jax-output', 'grid.png', 'labels.npy',
                                     'metrics.json', 'tokens.npy']
  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (3, 256, 16) and np.isfinite(tokens).all()
  # images 0 and 2 (both class 3, in different batches) have their own noise
  assert np.abs(tokens[0] - tokens[2]).max() > 0.1
  m = json.loads((out / 'metrics.json').read_text())
  assert m['steps_actual'] == [6, 5, 4, 3] and m['compilations']['backbone'] == 4
  assert m['num_iter'] == 4 and m['images_per_s'] > 0
