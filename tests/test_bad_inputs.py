"""Bad inputs and faults, one row each: what is given, the one-line message expected, and that
nothing was written (issue 11: converters, model directories, config ranges, non-finite
batches, resumed runs, reference statistics, project files).

Each row's `run(ctx)` performs the command (a converter's `main`, or the library function an
entry point calls) and returns the error text; `check_row` asserts it is one line holding the
expected fragment and that none of the row's output paths exists afterwards. Rows for safe
fallbacks (an old model directory, a truncated checkpoint, a corrupt shard) follow the table.
"""

import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CACHE, REPO
from helpers import tiny_model

from disa_jax import integrity, validation
from disa_jax.checkpoint import CheckpointError, load_mar, save_model
from disa_jax.cli.common import CliError
from disa_jax.config import digits_config, mar_config
from disa_jax.convert.cli import main as convert_main
from disa_jax.convert.mapping import ConversionError, flax_state_to_torch
from disa_jax.engine.runner import make_sampler as real_make_sampler
from disa_jax.errors import UserError
from disa_jax.eval.metrics import ReferenceError as ReferenceStatsError
from disa_jax.train.loop import TrainingError

USER_ERRORS = (UserError, CheckpointError, ConversionError, CliError, TrainingError,
               ReferenceStatsError)
TINY_HEADS = '4'
PIXELS = dict(vae_stride=8, patch_size=2, vae_embed_dim=3)   # 16 tokens, 8x8 RGB images


class Evil:
  """Unpickling this would run a shell command that creates a marker file."""

  marker = ''

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@dataclasses.dataclass
class Row:
  id: str
  command: str                              # what a user runs (for the reader of a failure)
  run: Callable                             # ctx -> error text (one line expected)
  expect: str                               # fragment of that line
  outputs: tuple = ()                       # names under ctx.tmp that must not exist
  forbid: tuple = ('Traceback', 'weights_only', 'allow_pickle')
  slow: bool = False                        # compiles a sampler (> ~20 s on 2 CPU cores)


def user_error(fn) -> str:
  """The message of the user error `fn()` raises (fails if it raises nothing or a bug)."""
  try:
    fn()
  except USER_ERRORS as e:
    return str(e)
  raise AssertionError('no error raised')


def convert(ctx, kind, name, *extra) -> str:
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = convert_main([kind, '--torch-checkpoint', str(ctx.tmp / name), '--out',
                       str(ctx.tmp / 'out'), *extra])
  text = err.getvalue()
  assert rc == 2, text
  lines = [ln for ln in text.splitlines() if ln.startswith('error:')]
  assert len(lines) == 1 and text.startswith('error:'), text
  return text


# ------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A tiny MAR (16 tokens, 8x8 RGB pixels) as torch tensors and as a model directory."""
  torch = pytest.importorskip('torch')
  root = tmp_path_factory.mktemp('bad_inputs')
  model = tiny_model(seed=3, **PIXELS)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in flax_state_to_torch(
    __import__('flax').nnx.state(model, __import__('flax').nnx.Param)).items()}
  save_model(root / 'model', model, kind='mar', model_config=model.config.to_dict())
  return {'root': root, 'sd': sd, 'model': model, 'torch': torch}


class Ctx:
  def __init__(self, base, tmp):
    self.base, self.tmp, self.torch = base, tmp, base['torch']

  def save_sd(self, name, **changes):
    sd = dict(self.base['sd'])
    sd.update(changes)
    self.torch.save({'model_ema': sd}, self.tmp / name)
    return name

  def model_dir(self, name='model'):
    shutil.copytree(self.base['root'] / 'model', self.tmp / name)
    return self.tmp / name


def _tensor(ctx, fn):
  w = ctx.base['sd']['z_proj.weight']
  return fn(w)


def _param_file(d: Path) -> Path:
  return max((p for p in (d / 'params').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(ctx):
  d = ctx.model_dir()
  f = _param_file(d)
  raw = bytearray(f.read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 8):
    raw[i] ^= 0xFF
  f.write_bytes(bytes(raw))
  return d


def _truncate(ctx):
  d = ctx.model_dir()
  f = _param_file(d)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  return d


def _sample_config(ctx, checkpoint, **sampling):
  c = mar_config('mar_base', tiny=True)
  c.model.update(PIXELS)
  c.tokenizer.kind = 'pixels'
  c.checkpoint = str(checkpoint)
  c.runtime.compilation_cache = CACHE
  c.runtime.num_devices = 1
  c.sampling.update(num_iter=4, upper_steps=3, lower_steps=2, num_images=4, batch_size=4)
  c.sampling.update(sampling)
  return c


def _evidence_out_file(ctx):
  from disa_jax.io.output import FileSet

  (ctx.tmp / 'afile').write_text('mine')
  text = user_error(lambda: FileSet(str(ctx.tmp / 'afile'), True).check(['variance']))
  assert (ctx.tmp / 'afile').read_text() == 'mine'
  return text


def _all_devices(config):
  config.runtime.num_devices = 0
  return config


def _sample(ctx, config):
  from disa_jax.cli.sample import sample

  return user_error(lambda: sample(config, str(ctx.tmp / 'out'), show_progress=False))


def _validate(section, **fields):
  def run(ctx):
    c = digits_config(tiny=True)
    c[section].update(fields)
    return user_error(lambda: validation.validate_config(c))
  return run


def _train_flowar_last_t(ctx):
  from disa_jax.systems.flowar.config import flowar_config
  from disa_jax.train.loop import train

  c = flowar_config('S', 'tiny')
  c.unlock()
  c.train.last_t_fraction = 0.3
  return user_error(lambda: train(c, ctx.tmp / 'w'))


def _reference(ctx, **arrays):
  from disa_jax.eval.metrics import ReferenceStats

  path = ctx.tmp / 'ref.npz'
  if arrays:
    np.savez(path, **arrays)
  return user_error(lambda: ReferenceStats.load(path))


def _non_psd(ctx):
  sigma = np.eye(2048)
  sigma[0, 0] = -1.0
  return _reference(ctx, mu=np.zeros(2048), sigma=sigma)


def _pickled_reference(ctx):
  with open(ctx.tmp / 'ref.npz', 'wb') as f:
    pickle.dump({'mu': np.zeros(2048)}, f)
  return _reference(ctx)


def _object_npz(ctx):
  np.savez(ctx.tmp / 'ref.npz', mu=np.array([{'a': 1}], dtype=object), sigma=np.eye(2))
  return _reference(ctx)


def _code_pickle(ctx):
  Evil.marker = str(ctx.tmp / 'PWNED')
  with open(ctx.tmp / 'evil.pth', 'wb') as f:
    pickle.dump({'model_ema': Evil()}, f, protocol=2)
  text = convert(ctx, 'mar', 'evil.pth')
  assert not (ctx.tmp / 'PWNED').exists(), 'the pickle payload ran'
  return text


def _bad_meta(ctx):
  d = ctx.model_dir()
  (d / 'meta.json').write_text('{"format": "disa_jax.model", ')
  return user_error(lambda: load_mar(d))


def _nan_batch(ctx, monkeypatch):
  import dataclasses

  from disa_jax.systems import mar

  model = tiny_model(seed=3, **PIXELS)
  model.z_proj.bias[...] = np.full(model.z_proj.bias.shape, np.nan, np.float32)
  nan_system = dataclasses.replace(mar.SYSTEM, build_model=lambda config, seed=0: (model, 'nan'))
  monkeypatch.setattr(mar, 'SYSTEM', nan_system)
  return _sample(ctx, _sample_config(ctx, ''))


def _bad_run_json(ctx):
  from disa_jax.io.output import ResumableDir

  partial = ctx.tmp / 'eval.partial'
  (partial / 'shards').mkdir(parents=True)
  (partial / 'shards' / 'b0000000.p000.npz').write_bytes(b'kept')
  (partial / 'run.json').write_text('{"format": "disa_jax.eval", "ver')
  def prepare():
    with ResumableDir(str(ctx.tmp / 'eval')) as rd:
      rd.prepare({})

  text = user_error(prepare)
  assert (partial / 'shards' / 'b0000000.p000.npz').exists()       # the work is kept
  return text


def _nan_model_dir(ctx):
  model = tiny_model(seed=3, **PIXELS)
  model.mask_token[...] = np.full(model.mask_token.shape, np.nan, np.float32)
  save_model(ctx.tmp / 'nan', model, kind='mar', model_config=model.config.to_dict())
  return user_error(lambda: load_mar(ctx.tmp / 'nan'))


def _nan_model():
  """The tiny model with NaN in z_proj.bias: every sampled token comes out NaN."""
  model = tiny_model(seed=3, **PIXELS)
  model.z_proj.bias[...] = np.full(model.z_proj.bias.shape, np.nan, np.float32)
  return model


def _nan_sampler(ctx):
  from disa_jax.engine import runner

  config = _sample_config(ctx, '', cfg=2.0)
  return runner.make_sampler(_nan_model(), config, runner.make_mesh(config)), config


class NaNSampler:
  """A real MAR sampler's plan and bookkeeping, whose `generate` returns NaN tokens of the real
  shape without compiling anything: the commands' own non-finite checks are what is tested
  (the real NaN path through a compiled sampler is `test_nan_batch_is_an_error_...` and the
  `nan-evidence` row)."""

  def __init__(self, real):
    self.real, self.mesh, self.compile_log = real, real.mesh, {}
    self.last_stats = types.SimpleNamespace(wall_s=0.0)

  def plan(self, *args, **kwargs):
    return self.real.plan(*args, **kwargs)

  def compile(self, plan):
    return 0.0

  def generate(self, labels, key, **kwargs):
    cfg = self.real.config
    return np.full((len(labels), cfg.seq_len, cfg.token_embed_dim), np.nan, np.float32)


def _fast_nan_sampler(model, config, mesh):
  return NaNSampler(real_make_sampler(model, config, mesh))   # (runner's is patched in _demo)


def _nan_bench(ctx):
  """disa-bench's library (`benchmark.run_benchmark`) on a sampler that returns NaN."""
  from disa_jax import benchmark
  from disa_jax.engine import runner

  config = _sample_config(ctx, '')
  mesh = runner.make_mesh(config)
  return user_error(lambda: benchmark.run_benchmark(
    _nan_model(), 'nan', [benchmark.RunSpec.parse('m=mar:4:3')],
    sampler_factory=lambda m: _fast_nan_sampler(m, config, mesh), batch_size=2, cfg=2.0,
    cfg_schedule='linear', temperature=1.0, log=lambda m: None))


def _nan_evidence(ctx):
  """disa-evidence variance (`evidence.probe_steps`): the sampling run it probes is NaN."""
  from disa_jax.engine import runner
  from disa_jax.eval import evidence

  sampler, config = _nan_sampler(ctx)
  return user_error(lambda: evidence.probe_steps(
    sampler, np.arange(2, dtype=np.int32), jax.random.key(0), plan=runner.step_plan(config),
    sampling=config.sampling, batch_size=2, measures=['variance'], samples=2, probe_steps=3))


def _nan_curves(ctx):
  """disa-evidence curves (`curves.speed_quality`): its warm-up batch is already NaN."""
  from disa_jax.engine import runner
  from disa_jax.eval import curves

  config = _sample_config(ctx, '', cfg=2.0)
  sampler = _fast_nan_sampler(_nan_model(), config, runner.make_mesh(config))
  return user_error(lambda: curves.speed_quality(
    sampler, None, np.arange(2, dtype=np.int32), runs=[curves.RunSpec.parse('m=mar:4:3')],
    sampling=config.sampling, key=jax.random.key(0), batch_size=2, metric=None))


def _demo(ctx, model, batch_size, num_devices=0, sampler_factory=None):
  """disa-demo (`demo.demo`, on `num_devices` of the 8 CPU devices; 0 = all) on `model` (in
  place of its model directory)."""
  from disa_jax import checkpoint
  from disa_jax.cli import demo
  from disa_jax.systems.mar import variants

  def small_digits_config():
    c = digits_config()
    c.runtime.num_devices, c.runtime.compilation_cache = num_devices, CACHE
    return c

  args = demo.DemoArgs(checkpoint=str(ctx.tmp / 'model'), out=str(ctx.tmp / 'out'),
                       num_images=2, batch_size=batch_size, num_iter=4, mar_steps=3,
                       disa_upper=3, disa_lower=2)
  with pytest.MonkeyPatch.context() as mp:
    if sampler_factory is not None:
      from disa_jax.engine import runner

      mp.setattr(runner, 'make_sampler', sampler_factory)
    mp.setattr(checkpoint, 'load_mar', lambda path, **kw: model)
    mp.setattr(variants, 'digits_config', small_digits_config)
    return user_error(lambda: demo.demo(args, print_fn=lambda *a: None))


def _bench_batch(ctx):
  """disa-bench --batch-size=2 on 8 devices (`systems/mar/bench.benchmark`)."""
  from disa_jax.schedules import RunSpec
  from disa_jax.systems.mar import bench

  config = _sample_config(ctx, '')
  config.runtime.num_devices = 0
  return user_error(lambda: bench.benchmark(config, [RunSpec.parse('m=mar:4:3')], batch_size=2,
                                            log=lambda m: None))



TINY = f'{REPO}/configs/mar/base.py:tiny'


def _cli_env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  return env


def cli_row(command: str, args: list, expect: str) -> Row:
  """A row that runs `python -m disa_jax.cli.<command> ARGS --out=TMP/out` (disa-bench prints
  only: no --out) and returns its stderr; the exit status must be 2."""
  def run(ctx):
    import subprocess

    out_flag = [] if command == 'bench' else [f'--out={ctx.tmp / "out"}']
    r = subprocess.run([sys.executable, '-m', f'disa_jax.cli.{command}', *args, *out_flag],
                       capture_output=True, text=True, env=_cli_env(), cwd=ctx.tmp, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith('error: ') and 'Traceback' not in r.stderr, r.stderr
    rest = r.stderr.splitlines()[1:]           # at most absl's hint to --help
    assert all(line.startswith('Try --help') for line in rest), r.stderr
    return r.stderr.splitlines()[0]

  return Row(f'{command}:{" ".join(args)[-40:]}', f'disa-{command} {" ".join(args)}', run, expect,
             ('out', 'out.partial'))


ROWS = [
  # Rule 2: converters accept only what a model can be.
  Row('int-tensor', 'disa-convert mar (int64 z_proj.weight)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.weight': _tensor(
        c, lambda w: w.to(c.torch.int64))}), '--num-heads', TINY_HEADS),
      'tensor z_proj.weight has dtype int64; a model parameter must be floating point',
      ('out',)),
  Row('bool-tensor', 'disa-convert mar (bool tensor)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.weight': _tensor(
        c, lambda w: w > 0)}), '--num-heads', TINY_HEADS),
      'tensor z_proj.weight has dtype bool', ('out',)),
  Row('complex-tensor', 'disa-convert mar (complex tensor)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.weight': _tensor(
        c, lambda w: w.to(c.torch.complex64))}), '--num-heads', TINY_HEADS),
      'tensor z_proj.weight has dtype complex64', ('out',)),
  Row('nan-tensor', 'disa-convert mar (NaN in a tensor)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'mask_token': _tensor(
        c, lambda w: c.base['sd']['mask_token'] * float('nan'))}), '--num-heads', TINY_HEADS),
      'tensor mask_token contains', ('out',)),
  Row('inf-tensor', 'disa-convert mar (Inf in a tensor)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.bias': _tensor(
        c, lambda w: c.base['sd']['z_proj.bias'] + float('inf'))}), '--num-heads', TINY_HEADS),
      'tensor z_proj.bias contains', ('out',)),
  Row('f64-overflow', 'disa-convert mar (float64 beyond float32 range)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.bias': _tensor(
        c, lambda w: c.base['sd']['z_proj.bias'].double() + 1e300)}), '--num-heads', TINY_HEADS),
      'tensor z_proj.bias contains', ('out',)),
  Row('wrong-ndim', 'disa-convert mar (z_proj.weight flattened)',
      lambda c: convert(c, 'mar', c.save_sd('x.pth', **{'z_proj.weight': _tensor(
        c, lambda w: w.reshape(-1))}), '--num-heads', TINY_HEADS),
      'z_proj.weight has shape (', ('out',)),
  Row('code-pickle', 'disa-convert mar (a pickle calling os.system)', _code_pickle,
      'contains objects other than tensors; refusing to unpickle it (it references posix.system',
      ('out', 'PWNED')),
  # Rule 3: model directories are verified on load.
  Row('flipped-bytes', 'load_mar / disa-sample --checkpoint (altered parameter file)',
      lambda c: user_error(lambda: load_mar(_flip(c))), 'is corrupt: params/', ()),
  Row('truncated-params', 'load_mar (truncated parameter file)',
      lambda c: user_error(lambda: load_mar(_truncate(c))), 'does not match its checksum', ()),
  Row('flipped-sample', 'disa-sample --checkpoint=ALTERED',
      lambda c: _sample(c, _sample_config(c, _flip(c))), 'is corrupt: params/', ('out',
                                                                                 'out.partial')),
  Row('nan-model-dir', 'load_mar (a directory saved with NaN weights)', _nan_model_dir,
      'holds non-finite values (NaN/Inf) in parameter mask_token', ()),
  Row('meta-json', 'load_mar (meta.json not JSON)', _bad_meta,
      'meta.json is not valid JSON', ()),
  Row('arch-mismatch', 'disa-sample --config.model.encoder_depth=3 (checkpoint has 2)',
      lambda c: user_error(lambda: load_mar(c.model_dir(), expect_config={
        **c.base['model'].config.to_dict(), 'encoder_depth': 3})),
      'encoder_depth: config 3 vs checkpoint 2', ()),
  # Rule 1: nothing non-finite or out of range.
  Row('cfg-negative', '--cfg=-2', _validate('sampling', cfg=-2.0),
      '--config.sampling.cfg must be a finite number in [0, 100]', ()),
  Row('cfg-nan', '--cfg=nan', _validate('sampling', cfg=float('nan')),
      '--config.sampling.cfg must be a finite number in [0, 100]', ()),
  Row('temperature-nan', '--temperature=nan', _validate('sampling', temperature=float('nan')),
      '--config.sampling.temperature must be a finite number in (0, 100]', ()),
  Row('temperature-inf', '--temperature=inf', _validate('sampling', temperature=float('inf')),
      'got inf', ()),
  Row('max-timestep-0', '--max-timestep=0', _validate('sampling', max_timestep=0),
      '--config.sampling.max_timestep must be an integer in [1, 999] or -1', ()),
  Row('max-timestep-5000', '--max-timestep=5000', _validate('sampling', max_timestep=5000),
      'got 5000', ()),
  Row('num-iter-0', '--num-iter=0', _validate('sampling', num_iter=0),
      '--config.sampling.num_iter must be an integer >= 1', ()),
  Row('steps-0', '--upper-steps=0', _validate('sampling', upper_steps=0),
      '--config.sampling.upper_steps must be an integer in [1, 1000]', ()),
  Row('batch-0', '--batch-size=0', _validate('sampling', batch_size=0),
      '--config.sampling.batch_size must be an integer >= 1', ()),
  Row('blr-nan', '--config.train.blr=nan', _validate('train', blr=float('nan')),
      '--config.train.blr must be a finite number in (0, 1]', ()),
  Row('b2-one', '--config.train.b2=1', _validate('train', b2=1.0), 'Adam beta2', ()),
  Row('ema-rate', '--config.train.ema_rate=1.5', _validate('train', ema_rate=1.5),
      '--config.train.ema_rate must be a finite number in [0, 1]', ()),
  Row('last-t-fraction', '--config.train.last_t_fraction=1',
      _validate('train', last_t_fraction=1.0), '--config.train.last_t_fraction must be', ()),
  Row('last-t-flowar', 'disa-train (FlowAR) --config.train.last_t_fraction=0.3',
      _train_flowar_last_t, "applies to MAR's diffusion head only, not to flowar", ('w',)),
  Row('flip-prob', '--config.data.flip_prob=2', _validate('data', flip_prob=2.0),
      '--config.data.flip_prob', ()),
  Row('sample-cfg-nan', 'disa-sample --cfg=nan',
      lambda c: _sample(c, _sample_config(c, '', cfg=float('nan'))),
      'cfg must be a finite number', ('out', 'out.partial')),
  Row('run-json', 'disa-eval (resuming; run.json damaged)', _bad_run_json,
      'run.json is not valid JSON', ('eval',)),
  Row('nan-bench', 'disa-bench (a model that samples NaN)', _nan_bench,
      'the sampled batch holds', ()),
  Row('nan-evidence', 'disa-evidence variance (a model that samples NaN)', _nan_evidence,
      'non-finite values (NaN/Inf)', (), slow=True),
  Row('nan-curves', 'disa-evidence curves (a sampler that returns NaN)', _nan_curves,
      'the sampled batch holds', ()),
  Row('nan-demo', 'disa-demo (a sampler that returns NaN)',
      lambda c: _demo(c, _nan_model(), 2, num_devices=1, sampler_factory=_fast_nan_sampler),
      'the sampled batch holds', ('out', 'out.partial')),
  # Rule 6: a batch the devices do not divide, refused before any compile.
  Row('demo-batch-devices', 'disa-demo --batch-size=2 (8 devices)',
      lambda c: _demo(c, tiny_model(seed=3, **PIXELS), 2),
      'batch size 2 must be a multiple of the 8 data-parallel devices', ('out', 'out.partial')),
  Row('sample-batch-devices', 'disa-sample --batch-size=3 (8 devices; eval, evidence alike)',
      lambda c: _sample(c, _all_devices(_sample_config(c, '', batch_size=3))),
      'batch size 3 must be a multiple of the 8 data-parallel devices', ('out', 'out.partial')),
  # Rule 6: an output path that is a file, refused before any work.
  Row('evidence-out-file', 'disa-evidence variance --out=FILE', _evidence_out_file,
      'is a file; choose a directory', ()),
  Row('bench-batch-devices', 'disa-bench --batch-size=2 (8 devices)', _bench_batch,
      'batch size 2 must be a multiple of the 8 data-parallel devices', ()),
  # Rule 7 pieces: reference statistics.
  Row('ref-not-npz', 'disa-eval --ref-stats=PICKLE', _pickled_reference,
      'is not a .npz reference statistics file (not a zip archive)', ()),
  Row('ref-object-npz', 'disa-eval --ref-stats=NPZ-WITH-OBJECTS', _object_npz,
      'cannot be read as a numeric array (pickled objects)', ()),
  Row('ref-non-psd', 'disa-eval --ref-stats=NON-PSD', _non_psd,
      'sigma is not positive semi-definite', ()),
  # Environment errors of writes.
  Row('enospc', 'any write on a full disk',
      lambda c: str(integrity.write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                                  str(c.tmp / 'out' / 'x.png')))),
      'out/x.png: no space left on the device; free some space', ()),
  Row('eacces', 'any write without permission',
      lambda c: str(integrity.write_error(PermissionError(errno.EACCES, 'Permission denied',
                                                          '/ro/out'))),
      'cannot write /ro/out: permission denied', ()),
  # The commands themselves (flags, config files, overrides): one `error:` line, exit 2.
  cli_row('sample', ['--cfg=nan'], 'error: flag --cfg=nan: --cfg must be a finite number in [0, 100]'),
  cli_row('sample', ['--cfg=-2'], 'error: flag --cfg=-2.0: --cfg must be a finite number in [0, 100]'),
  cli_row('sample', ['--temperature=inf'], 'error: flag --temperature=inf: --temperature must be'),
  cli_row('sample', ['--temperature=nan'], 'error: flag --temperature=nan: --temperature must be'),
  cli_row('sample', ['--max-timestep=0'], 'error: flag --max_timestep=0: --max_timestep must be an integer in [1, 999] or -1'),
  cli_row('sample', ['--max-timestep=5000'], 'error: flag --max_timestep=5000: --max_timestep must'),
  cli_row('sample', [f'--config={TINY}', '--config.sampling.cfg=nan'], 'error: --cfg must be a finite number in [0, 100]'),
  cli_row('sample', [f'--config={TINY}', '--config.sampling.max_timestep=0'], 'error: --max_timestep must be an integer in [1, 999] or -1'),
  cli_row('sample', [f'--config={TINY}', '--config.sampling.foo=1'], 'error: unknown config field in --config.sampling.foo=1'),
  cli_row('sample', ['--config=/no/such/config.py'], 'error: config: [Errno 2] No such file'),
  cli_row('sample', [f'--config={TINY}', '--config.system=nosuch'], "error: unknown system 'nosuch'"),
  cli_row('eval', [f'--config={TINY}', '--temperature=0'], 'error: flag --temperature=0.0'),
  cli_row('evidence', ['variance', f'--config={TINY}', '--cfg=inf'], 'error: flag --cfg=inf'),
  cli_row('demo', ['--num-iter=0'], 'error: flag --num_iter=0'),
  cli_row('demo', ['--cfg=nan'], 'error: flag --cfg=nan'),
  cli_row('demo', ['--preset=disa'], 'error: --preset does not apply to disa-demo'),
  cli_row('demo', ['--mar-steps=abc'], "error: --mar-steps must be one integer for disa-demo, got 'abc'"),
  cli_row('demo', ['--disa-upper=0'], 'error: flag --disa_upper=0: --disa_upper must be an integer in'),
  cli_row('bench', [f'--config={TINY}', '--runs=bad'], "error: bad run spec 'bad'"),
  cli_row('bench', [f'--config={TINY}', '--seed=-1'], 'error: flag --seed=-1: --seed must be an integer'),
  cli_row('bench', [f'--config={REPO}/configs/flowar/s.py:tiny', '--cache=lazymar'],
          'error: --cache applies to MAR only (this config is flowar); drop it'),
  cli_row('evidence', ['curves', f'--config={TINY}', '--runs=bad'], "error: bad run spec 'bad'"),
  cli_row('evidence', ['curves', f'--config={TINY}', '--mar-steps=x'], 'error: --mar_steps must be'),
  cli_row('cache', ['--vae=/no/such/vae'], 'error: --source is required'),
  cli_row('cache', ['--source=folder', '--vae=/no/such/vae'],
          'error: VAE directory /no/such/vae does not exist'),
  cli_row('cache', ['--source=folder', '--vae=.', '--batch-size=0'],
          'error: flag --batch_size=0: --batch_size must be'),
]


@pytest.mark.parametrize('row', [pytest.param(r, marks=pytest.mark.slow) if r.slow else r
                                 for r in ROWS], ids=[r.id for r in ROWS])
def test_bad_input_row(row, base, tmp_path):
  ctx = Ctx(base, tmp_path)
  text = row.run(ctx)
  first = text.strip().splitlines()[0]
  assert row.expect in first, f'{row.command}: {text}'
  assert len(text.strip().splitlines()) == 1, f'{row.command}: not one line: {text}'
  for word in row.forbid:
    assert word not in text, f'{row.command}: {text}'
  for name in row.outputs:
    assert not (tmp_path / name).exists(), f'{row.command}: wrote {name}'
  assert not [p for p in tmp_path.iterdir() if '.tmp-' in p.name], 'temporary left behind'


def test_nan_batch_is_an_error_and_nothing_is_written(base, tmp_path, monkeypatch):
  ctx = Ctx(base, tmp_path)
  text = _nan_batch(ctx, monkeypatch)
  assert 'holds' in text and 'non-finite values (NaN/Inf)' in text and 'nothing was written' in text
  assert 'NaN/Inf weights' in text and 'cfg=2.0' in text
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.partial').exists()


def test_cli_prints_environment_errors_as_one_line(monkeypatch, capsys):
  """The shared CLI error path turns ENOSPC raised anywhere in a command into one line."""
  from disa_jax.cli import common

  def body(argv):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/full/out.partial/x.png')

  monkeypatch.setattr(sys, 'argv', ['disa-sample'])
  with pytest.raises(SystemExit) as e:
    common.main(body)
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err == ('error: cannot write /full/out.partial/x.png: no space left on the device; '
                 'free some space or write elsewhere\n')

  def wrapped(argv):      # as orbax / tensorstore report it: no errno, the text only
    raise ValueError('Error writing "params/d/1": [OSError] No space left on device [os_error]')

  with pytest.raises(SystemExit) as e:
    common.main(wrapped)
  assert e.value.code == 2
  assert capsys.readouterr().err == ('error: cannot write: no space left on the device; free '
                                     'some space or write elsewhere\n')


def test_real_enospc_from_dev_full_is_one_line():
  """A write that really fails with ENOSPC (the kernel's /dev/full), through the shared
  message."""
  with pytest.raises(OSError) as e, open('/dev/full', 'wb', buffering=0) as f:
    f.write(b'x' * 4096)
  assert e.value.errno == errno.ENOSPC
  assert str(integrity.write_error(e.value)).endswith(
    'no space left on the device; free some space or write elsewhere')


@pytest.fixture
def full_fs(tmp_path):
  """A 1 MiB tmpfs filled up to its last ~8 KiB (needs the right to mount: root in CI)."""
  import subprocess

  mnt = tmp_path / 'full'
  mnt.mkdir()
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mnt)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f'cannot mount a size-limited tmpfs here ({r.stderr.strip()}); the ENOSPC '
                'path is still covered by test_real_enospc_from_dev_full_is_one_line')
  try:
    with open(mnt / 'filler', 'wb') as f:
      f.write(b'\0' * (1024 * 1024 - 8192))
    yield mnt
  finally:
    subprocess.run(['umount', str(mnt)], check=False)


def test_real_full_disk_model_write_and_json_are_one_line_and_leave_nothing(full_fs,
                                                                           monkeypatch, capsys):
  """On a really full file system, writing a model directory (orbax / tensorstore underneath)
  and a JSON file end as one `error:` line through the commands' error path, and leave no
  temporary or partial file behind."""
  from disa_jax.cli import common
  from disa_jax.io.output import write_json

  model = tiny_model(seed=0, **PIXELS)
  monkeypatch.setattr(sys, 'argv', ['disa-convert'])
  for body in (lambda argv: save_model(full_fs / 'model', model, kind='mar',
                                       model_config=model.config.to_dict()),
               lambda argv: write_json(full_fs / 'metrics.json', {'x': list(range(5000))})):
    with pytest.raises(SystemExit) as e:
      common.main(body)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith('error: cannot write') and err.count('\n') == 1, err
    assert 'no space left on the device' in err and 'Traceback' not in err
    assert sorted(p.name for p in full_fs.iterdir()) == ['filler'], 'partial output left'


# ------------------------------------------------------------------------------------------
# Accepted inputs and safe fallbacks
def test_half_precision_and_float64_tensors_are_cast(base, tmp_path):
  ctx = Ctx(base, tmp_path)
  torch = ctx.torch
  sd = {k: v.to(torch.bfloat16) if k.startswith('encoder') else
        v.to(torch.float16) if k.startswith('decoder') else v.double() for k, v in
        base['sd'].items()}
  torch.save({'model_ema': sd}, tmp_path / 'mixed.pth')
  assert convert_main(['mar', '--torch-checkpoint', str(tmp_path / 'mixed.pth'), '--out',
                       str(tmp_path / 'out'), '--num-heads', TINY_HEADS]) == 0
  got = flax_state_to_torch(__import__('flax').nnx.state(load_mar(tmp_path / 'out'),
                                                         __import__('flax').nnx.Param))
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v.float().numpy(), err_msg=k)


def test_old_model_directory_without_checksums_loads_with_a_warning(base, tmp_path, capsys):
  d = Ctx(base, tmp_path).model_dir('old')
  (d / integrity.CHECKSUM_FILE).unlink()
  model = load_mar(d)
  assert f'{d} has no checksums.json' in capsys.readouterr().err
  np.testing.assert_array_equal(np.asarray(model.mask_token[...]),
                                np.asarray(base['model'].mask_token[...]))


def test_bundled_model_has_verified_checksums():
  from disa_jax.config import bundled_digits_checkpoint

  files = integrity.verify_checksums(bundled_digits_checkpoint())
  assert files and any(k.startswith('params/') for k in files)


def test_stale_temporary_of_a_killed_write_is_removed(base, tmp_path):
  dead = next(p for p in range(4_000_000, 3_000_000, -7919) if not integrity._alive(p))
  stale = tmp_path / f'.out.tmp-{dead}-abc123'
  stale.mkdir()
  (stale / 'params').mkdir()
  live = tmp_path / f'.out.tmp-{os.getpid()}-other'     # a write in progress: left alone
  live.mkdir()
  save_model(tmp_path / 'out', base['model'], kind='mar',
             model_config=base['model'].config.to_dict())
  assert not stale.exists() and live.exists()
  assert (tmp_path / 'out' / integrity.CHECKSUM_FILE).exists()


def test_event_files_are_purged_after_the_resumed_step(tmp_path):
  from tensorboardX import SummaryWriter

  from disa_jax.train.metrics import MetricWriter

  w = SummaryWriter(str(tmp_path / 'tensorboard'))
  for s in range(1, 7):
    w.add_scalar('train/loss', float(s), s)
  w.close()
  (tmp_path / 'metrics.jsonl').write_text(''.join(
    json.dumps({'step': s, 'loss': float(s)}) + '\n' for s in range(1, 7)) + '{"step": 7, "lo')
  mw = MetricWriter(tmp_path)
  mw.truncate_after(4)
  for s in (5, 6):
    mw.write(s, {'loss': 10.0 + s})
  mw.close()
  from test_train import _tb_scalars

  events = sorted((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  steps = []
  for path in events:
    steps += list(_tb_scalars([path], 'train/loss'))
  assert sorted(steps) == [1, 2, 3, 4, 5, 6]                     # no step twice
  assert _tb_scalars(events, 'train/loss')[6] == 16.0
  lines = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in lines] == [1, 2, 3, 4, 5, 6] and lines[-1]['loss'] == 16.0


# ------------------------------------------------------------------------------------------
# disa-eval: a resumed run is the same run; a corrupt shard is regenerated
def test_eval_resume_checks_the_model_files_and_regenerates_corrupt_shards(base, tmp_path,
                                                                            capsys):
  from disa_jax.cli.eval import evaluate

  ctx = Ctx(base, tmp_path)
  ckpt = ctx.model_dir('ckpt')
  config = _sample_config(ctx, ckpt, num_images=20, batch_size=8, cfg=2.0)
  out = tmp_path / 'eval'
  kw = dict(metric_name='none', show_progress=False)
  assert evaluate(config, str(out), max_batches=2, **kw) is None
  shards = sorted((tmp_path / 'eval.partial' / 'shards').iterdir())
  assert len(shards) == 2
  # the model directory at the same path replaced by another model: refused, named
  save_model(ckpt, tiny_model(seed=9, **PIXELS), kind='mar',
             model_config=base['model'].config.to_dict(), overwrite=True)
  text = user_error(lambda: evaluate(config, str(out), **kw))
  assert 'holds an interrupted run with other settings (checkpoint_sha256: was' in text
  assert len(text.splitlines()) == 1
  assert sorted((tmp_path / 'eval.partial' / 'shards').iterdir()) == shards   # untouched
  shutil.rmtree(ckpt)
  shutil.copytree(base['root'] / 'model', ckpt)                                # the original
  # a truncated shard: named, discarded, generated again
  shards[1].write_bytes(shards[1].read_bytes()[:40])
  capsys.readouterr()
  result = evaluate(config, str(out), **kw)
  err = capsys.readouterr().err
  assert f'discarding the unreadable shard {shards[1]}' in err
  assert result['batches_reused'] == 1 and result['batches_run'] == 2
  assert (out / 'metrics.json').exists() and not (tmp_path / 'eval.partial').exists()


# ------------------------------------------------------------------------------------------
# disa-train: resume refuses other settings; a truncated newest checkpoint falls back
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from disa_jax.data import digits
  from disa_jax.train import loop

  root = tmp_path_factory.mktemp('train')
  cache = digits.build_cache(root / 'cache')
  c = digits_config(tiny=True)
  c.data.cache_dir = str(cache)
  c.runtime.compilation_cache = CACHE
  c.train.update(num_steps=4, log_every=1, checkpoint_every=2)
  res = loop.train(c, root / 'run', print_fn=lambda s: None)
  assert res.step == 4
  return root / 'run', c


@pytest.mark.parametrize('field,value,message', [
  ('seed', 2, 'train.seed: was 1, now 2'),
  ('batch_size', 8, 'train.batch_size: was 16, now 8'),
  ('blr', 0.01, 'train.blr: was 0.016, now 0.01'),
])
def test_train_resume_with_other_settings_refuses(trained, tmp_path, field, value, message):
  from disa_jax.train import loop

  run, config = trained
  work = tmp_path / 'run'
  shutil.copytree(run, work)
  before = {p: p.stat().st_mtime_ns for p in work.rglob('*')}
  c = config.copy_and_resolve_references()
  c.train[field] = value
  c.train.num_steps = 6
  text = user_error(lambda: loop.train(c, work, print_fn=lambda s: None))
  assert message in text and 'a resumed run must be the same run' in text
  assert len(text.splitlines()) == 1
  assert {p: p.stat().st_mtime_ns for p in work.rglob('*')} == before      # nothing written


def test_train_invalid_config_json_is_named(trained, tmp_path):
  from disa_jax.train import loop

  run, config = trained
  work = tmp_path / 'run'
  shutil.copytree(run, work)
  (work / 'config.json').write_text('{"model": ')
  text = user_error(lambda: loop.train(config, work, print_fn=lambda s: None))
  assert f'run config {work / "config.json"} is not valid JSON' in text


def test_truncated_newest_checkpoint_falls_back_and_steps_stay_unique(trained, tmp_path,
                                                                      capsys):
  from test_train import _tb_scalars

  from disa_jax.train import loop

  run, config = trained
  work = tmp_path / 'run'
  shutil.copytree(run, work)
  want = {json.loads(x)['step']: json.loads(x)['loss']
          for x in (run / 'metrics.jsonl').read_text().splitlines()}
  newest = work / 'checkpoints' / '4'
  for f in [p for p in newest.rglob('*') if p.is_file() and p.stat().st_size > 1000]:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  c = config.copy_and_resolve_references()
  c.train.num_steps = 5                       # may change on resume (documented)
  lines = []
  res = loop.train(c, work, print_fn=lines.append)
  err = capsys.readouterr().err
  assert 'warning: checkpoint 4 in' in err and 'resuming from the previous checkpoint' in err
  assert any('at step 2' in ln for ln in lines) and res.step == 5
  assert list((work / 'corrupt_checkpoints').iterdir())
  got = [json.loads(x) for x in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in got] == [1, 2, 3, 4, 5]
  for x in got[:4]:                           # steps 3-4 redone from step 2: the same losses
    assert x['loss'] == pytest.approx(want[x['step']], rel=1e-6)
  steps = []
  for path in (work / 'tensorboard').glob('events.out.tfevents.*'):
    steps += list(_tb_scalars([path], 'train/loss'))
  assert sorted(steps) == [1, 2, 3, 4, 5]
  assert json.loads((work / 'config.json').read_text())['train']['num_steps'] == 5
  assert jax.device_count() >= 1


def test_training_checkpoints_carry_checksums_and_a_flipped_byte_falls_back(trained, tmp_path,
                                                                          capsys):
  """Every finished checkpoint has checksums.json over its orbax items; one byte altered in
  the newest (same size, so only the checksum can tell) is named, set aside, and the run
  resumes from the previous one; `--export-only` on it is a one-line error."""
  from disa_jax import integrity
  from disa_jax.train import loop

  run, config = trained
  for step in ('2', '4'):
    listing = json.loads((run / 'checkpoints' / step / 'checksums.json').read_text())
    assert any(k.startswith('state/') for k in listing['files'])
    assert integrity.verify_checkpoint(run / 'checkpoints' / step)
  work = tmp_path / 'run'
  shutil.copytree(run, work)
  newest = work / 'checkpoints' / '4'
  big = max((p for p in (newest / 'state').rglob('*') if p.is_file()),
            key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x55
  big.write_bytes(bytes(data))
  text = user_error(lambda: loop.restore_state(work, config, step=4))
  assert 'training checkpoint' in text and 'does not match its checksum' in text
  c = config.copy_and_resolve_references()
  c.train.num_steps = 5
  lines = []
  res = loop.train(c, work, print_fn=lines.append)
  err = capsys.readouterr().err
  assert 'checkpoint 4 in' in err and 'CorruptModelError' in err
  assert any('at step 2' in ln for ln in lines) and res.step == 5
  assert (work / 'checkpoints' / '5' / 'checksums.json').exists()


def test_remove_tree_outlasts_a_late_writer(tmp_path):
  """A failed library write may re-create its directory (with parents) just after the error
  reaches us; the cleanup of atomic outputs keeps removing until the path stays gone."""
  import threading
  import time

  from disa_jax.io.output import remove_tree

  target = tmp_path / '.model.tmp-1-x'
  (target / 'params').mkdir(parents=True)

  def late_writer():
    time.sleep(0.03)
    (target / 'params' / 'late').mkdir(parents=True, exist_ok=True)
    (target / 'params' / 'late' / 'manifest').write_bytes(b'x')

  thread = threading.Thread(target=late_writer)
  thread.start()
  remove_tree(target)
  thread.join()
  assert not target.exists()
