"""The system seam (systems found by name), the shared flag rules and the output directory rules.

The bad-input rows of the commands themselves (one `error:` line, exit status 2, nothing
written) are rows of the one table in tests/test_bad_inputs.py (`cli_row`).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from disa_jax.errors import UserError
from disa_jax.systems.base import System, get_system, system_of

TINY = f'{REPO}/configs/mar/base.py:tiny'


def test_mar_system_found_by_name_and_complete():
  from disa_jax.config import mar_config

  system = get_system('mar')
  assert isinstance(system, System) and system.name == 'mar'
  config = mar_config('mar_base', tiny=True)
  assert config.system == 'mar' and system_of(config) is system
  plan = system.stage_plan(config.sampling)
  assert plan.num_iter == config.sampling.num_iter == 8
  assert plan.steps[0] == 10 and plan.steps[-1] == 3 and plan.max_timestep == 950
  labels = system.conditions(config, 25, order='cycle')
  assert labels.dtype == np.int32 and list(labels[:11]) == [*range(10), 0]
  with pytest.raises(UserError, match='multiple of the 10 classes'):
    system.conditions(config, 25, order='blocks')
  assert list(system.conditions(config, 20, order='blocks')[:3]) == [0, 0, 1]
  assert system.condition_count(config) == 10
  assert system.converter == 'disa_jax.systems.mar.convert'


def test_unknown_system_is_one_line_user_error():
  with pytest.raises(UserError, match="unknown system 'nosuch'"):
    get_system('nosuch')
  with pytest.raises(UserError, match='not a Python identifier'):
    get_system('../etc')


def test_baseline_preset_and_mar_alias_agree():
  from disa_jax.schedules import RunSpec, resolve_steps

  a = resolve_steps(num_iter=4, preset='baseline', upper=7)
  b = resolve_steps(num_iter=4, preset='mar', upper=7)
  assert a == b and a.steps == (7, 7, 7, 7) and a.max_timestep is None
  assert RunSpec.parse('b=baseline:4:7').step_plan() == a
  assert RunSpec.parse('m=mar:4:7').family == RunSpec.parse('b=baseline:4:7').family


def test_configs_are_locked_and_old_paths_forward():
  import importlib.util

  def load(rel):
    spec = importlib.util.spec_from_file_location('c', os.path.join(REPO, rel))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.get_config

  new, old = load('configs/mar/base.py')('cpu'), load('configs/mar_base.py')('cpu')
  assert new.to_dict() == old.to_dict() and new.system == 'mar'
  with pytest.raises(AttributeError):
    new.sampling.no_such_field = 1
  assert load('configs/digits.py')('tiny').to_dict() == load('configs/mar/digits.py')('tiny').to_dict()


class _Out:
  """OutputDir on a single process."""

  @staticmethod
  def make(out, **kw):
    from disa_jax.io.output import OutputDir

    return OutputDir(str(out), **kw)


def test_output_dir_marker_inputs_file_and_lock(tmp_path):
  from disa_jax.io.output import OUTPUT_MARKER, OutputLock

  out = tmp_path / 'out'
  with _Out.make(out) as od:
    (tmp_path / 'out.partial' / 'a.txt').write_text('1')
    assert od.path.endswith('.partial')
  assert (out / OUTPUT_MARKER).exists() and not (tmp_path / 'out.lock').exists()
  with _Out.make(out, overwrite=True) as od:     # ours: replaced
    pass
  assert not (out / 'a.txt').exists()
  user = tmp_path / 'user'
  user.mkdir()
  (user / 'precious').write_text('x')
  with pytest.raises(UserError, match='not written by disa_jax'):
    _Out.make(user, overwrite=True)
  assert (user / 'precious').exists()
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  with pytest.raises(UserError, match='would overwrite the input'):
    _Out.make(ckpt, overwrite=True, inputs=[str(ckpt)])
  with pytest.raises(UserError, match='would overwrite the input'):
    _Out.make(tmp_path, overwrite=True, inputs=[str(ckpt)])
  (tmp_path / 'file').write_text('x')
  with pytest.raises(UserError, match='is not a directory'):
    _Out.make(tmp_path / 'file', overwrite=True)
  held = OutputLock(str(tmp_path / 'busy'))
  held.acquire()
  with pytest.raises(UserError, match='another run .* is writing'):
    _Out.make(tmp_path / 'busy')
  held.release()
  stale = tmp_path / 'stale.lock'            # a dead process's lock on this host is taken over
  import socket

  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  stale.write_text(f'{dead}@{socket.gethostname()}')
  with _Out.make(tmp_path / 'stale'):
    pass
  assert (tmp_path / 'stale').exists() and not stale.exists()


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  return env


@pytest.mark.parametrize('command', ['sample', 'eval', 'bench', 'evidence', 'train', 'demo'])
def test_help_lists_the_commands_own_flags(command):
  r = subprocess.run([sys.executable, '-m', f'disa_jax.cli.{command}', '--help'],
                     capture_output=True, text=True, env=_env(), timeout=300)
  assert r.returncode == 0, r.stderr
  assert '--config' in r.stdout or command == 'demo'
  assert 'Try --helpfull' not in r.stdout and 'flags:' in r.stdout
  assert r.stdout.count('\n  --') >= 3


def test_convert_help_and_missing_flags(tmp_path):
  from disa_jax.convert.cli import main

  assert main(['--help']) == 0
  assert main(['mar', '--out', str(tmp_path / 'x')]) == 2
  assert main(['nosuch', '--torch-checkpoint', 'f', '--out', str(tmp_path / 'x')]) == 2
  assert not (tmp_path / 'x').exists()


def test_every_command_module_imports_into_one_process():
  """No two commands define the same flag: all command modules import together, in any order
  (shared flags live in `cli/flags.py` groups), and flag defaults do not leak between them."""
  modules = ['disa_jax.cli.sample', 'disa_jax.cli.bench', 'disa_jax.cli.eval',
             'disa_jax.cli.evidence', 'disa_jax.cli.demo', 'disa_jax.cli.train',
             'disa_jax.cli.cache', 'disa_jax.convert.cli']
  for order in (modules, modules[::-1]):
    code = ('import importlib\n'
            f'for m in {order!r}:\n  importlib.import_module(m)\n'
            'from absl import flags\nF = flags.FLAGS\n'
            "assert F['save_images'].default is True and F['metric'].default == 'inception'\n"
            "assert F['out'].default is None and F['batch_size'].default is None\n"
            "print('ok', len(list(F)))\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith('ok'), r.stderr[-2000:]


def test_compute_fields_are_listed_once_and_used_everywhere():
  """`systems.mar.model` lists the non-architecture fields once; loading, the architecture
  check and the train-resume fingerprint all follow that list."""
  from disa_jax import integrity
  from disa_jax.checkpoint import architecture_diff
  from disa_jax.systems.mar.model import (
    COMPUTE_FIELDS,
    NON_ARCHITECTURE_FIELDS,
    RESULT_NEUTRAL_FIELDS,
    MARConfig,
  )

  fields = {f.name for f in __import__('dataclasses').fields(MARConfig)}
  assert set(NON_ARCHITECTURE_FIELDS) <= fields
  assert set(RESULT_NEUTRAL_FIELDS) <= set(COMPUTE_FIELDS)
  base = MARConfig().to_dict()
  changed = {**base, 'dtype': 'bfloat16', 'attn_splits': 3, 'proj_dropout': 0.0}
  assert architecture_diff(base, changed) == []
  assert architecture_diff(base, {**changed, 'encoder_depth': 3}) == [
    f'encoder_depth: config {base["encoder_depth"]} vs checkpoint 3']
  stored = {'model': {'dtype': 'float32', 'attn_splits': 0}}
  diff = integrity.config_diff(stored, {'model': {'dtype': 'bfloat16', 'attn_splits': 4}},
                               may_change=integrity.train_may_change())
  assert diff == ['model.dtype: was "float32", now "bfloat16"'], diff


def test_one_command_seam_for_every_system():
  """Each command finds a system's own body through `find_command` (the `commands` module,
  by default `systems/<name>/commands.py`) or falls back to the shared body (None)."""
  import dataclasses

  from disa_jax.systems.base import COMMANDS, commands_module, find_command

  names = ['mar', 'flowar', 'xar', 'harmon', 'dar']
  for name in names:
    system = get_system(name)
    assert commands_module(system) == f'disa_jax.systems.{name}.commands'
    assert callable(find_command(system, 'bench')), name
    assert find_command(system, 'train') is None
  assert find_command(get_system('mar'), 'sample') is None        # the shared body
  assert find_command(get_system('mar'), 'eval') is None
  assert callable(find_command(get_system('dar'), 'sample'))
  assert callable(find_command(get_system('dar'), 'eval'))
  bare = dataclasses.replace(get_system('mar'), name='nosuch')
  assert commands_module(bare) is None and find_command(bare, 'bench') is None
  with pytest.raises(ValueError, match='unknown command'):
    find_command(get_system('mar'), 'nosuch')
  assert set(COMMANDS) == {'sample', 'bench', 'eval', 'train'}
