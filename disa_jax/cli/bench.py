"""disa-bench: MAR baseline(s) and DiSA side by side, in one process, on one model and batch.

  disa-bench --config=configs/mar_base.py --batch-size=4 --json
  disa-bench --config=configs/mar_base.py:cpu --runs=mar64=mar:64:100,disa64=disa:64:50:5 \\
      --torch --phases --dtypes=float32,bfloat16

Each run is `label=preset:num_iter:upper[:lower[:strategy]]`; the first run is the baseline
for speedups. Compilation happens before the timed repeats and is reported (total and per
bucket). Per run: sampling wall time, images/s, head token-steps per image, compilations,
padding waste, counted TFLOP per image (official algorithm and what runs here), achieved
TFLOP/s and its fraction of a matmul peak measured in the same process, the measured speedup
and the one predicted from counted FLOPs (and, with `--phases` or `--calibrate`, from a FLOP
model calibrated on the baseline's backbone / head split). `--phases` adds a synchronised pass splitting time
into backbone / head (/ VAE decode with --vae); `--torch` times the PyTorch reference
(`reference.mar`: same weights, batch and schedule); `--dtypes` repeats
everything per compute dtype and reports bfloat16's error against float32.

Harmon configs (configs/harmon/*.py) run Harmon's own comparison instead
(`disa_jax.systems.harmon.bench.disa_bench`): the baseline (100 steps) and DiSA 100 -> 5,
50 -> 5, 25 -> 5 side by side, time split MAR encoder / LLM / MAR decoder / head:
  disa-bench --config=configs/harmon/0_5b.py:cpu --batch-size=2 --config.sampling.num_iter=16
"""

from __future__ import annotations

import json
import sys

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config()
cli_flags.define_model()
cli_flags.define_system_flags()
cli_flags.define_batch()        # --batch_size (default 4 here), --seed (default 0 here)
cli_flags.define_guidance()     # --cfg, --cfg_schedule, --temperature (default: the config's)
cli_flags.define_runs()
flags.DEFINE_integer('repeats', 1, 'Timed repeats per run (the minimum is reported).')
flags.DEFINE_bool('phases', False, 'Extra synchronised pass timing backbone, head (, decode).')
flags.DEFINE_bool('calibrate', False, 'Phase pass on the baseline only, for the calibrated FLOP '
                  'prediction (implied by --phases).')
flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference on the same weights.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: leave the default).')
flags.DEFINE_string('dtypes', None, 'Compute dtypes to run, e.g. float32,bfloat16 '
                    '(default: the config\'s).')
flags.DEFINE_string('quality', None, 'Quality metric for each run\'s images (e.g. digits).')
flags.DEFINE_bool('json', False, 'Print the result as JSON only.')
flags.DEFINE_string('json_out', None, 'Also write the JSON result to this file.')

FLAGS = flags.FLAGS

DEFAULT_RUNS = 'mar256=mar:256:100,mar64=mar:64:100,disa64=disa:64:50:5:linear'
DEFAULT_BATCH_SIZE = 4


def benchmark(config, specs, *, batch_size: int, dtypes=None, repeats=1, phases=False,
              calibrate=False, with_torch=False, seed=0, cfg=None, cfg_schedule=None, torch_threads=0,
              quality=None, log=print) -> dict:
  """Runs `specs` (list of `RunSpec`) for each compute dtype; returns the result dict."""
  from disa_jax import benchmark as bm
  from disa_jax.engine import runner

  cfg = config.sampling.cfg if cfg is None else cfg
  cfg_schedule = cfg_schedule or config.sampling.cfg_schedule
  for s in specs:
    s.step_plan()                                              # validate before loading
  model, source = runner.build_model(config, seed=seed)
  decoder = runner.build_decoder(config, model)
  metric = None
  if quality:
    from disa_jax.eval.quality import get_quality_metric

    metric = get_quality_metric(quality)
  mesh = runner.make_mesh(config)
  runner.check_batch_size(batch_size, mesh)
  dtypes = dtypes or [model.config.dtype]
  out = {'config': config.get('name', ''), 'results': []}
  models = {}
  for dt in dtypes:
    models[dt] = bm.with_dtype(model, dt)
    log(f'=== dtype {dt}')
    res = bm.run_benchmark(
      models[dt], source, specs, sampler_factory=lambda m: runner.make_sampler(m, config, mesh),
      batch_size=batch_size, cfg=cfg, cfg_schedule=cfg_schedule,
      temperature=config.sampling.temperature, repeats=repeats, phases=phases, calibrate=calibrate,
      decoder=decoder,
      with_torch=with_torch and dt == 'float32', torch_threads=torch_threads, quality=metric,
      seed=seed, log=log)
    res['config'] = out['config']
    out['results'].append(res)
  if len(dtypes) > 1:
    ref = dtypes[0]
    out['precision'] = {dt: bm.precision_report(models[ref], models[dt], seed=seed)
                        for dt in dtypes[1:]}
    for dt in dtypes[1:]:
      base = {r['label']: r for r in out['results'][0]['runs']}
      res = out['results'][dtypes.index(dt)]
      out['precision'][dt]['speedup_over_' + ref] = {
        r['label']: round(base[r['label']]['wall_s'] / r['wall_s'], 4) for r in res['runs']}
  # Single-dtype results keep the flat layout (runs at top level).
  if len(dtypes) == 1:
    single = out['results'][0]
    return single
  return out


def _run(argv):
  del argv
  from disa_jax.benchmark import RunSpec, format_table

  config = common.config_value(_CONFIG)
  own = cli_flags.system_command(config, 'bench') if config is not None else None
  if own is not None:          # a system with its own command body and checks (D-AR)
    common.setup_runtime(config)
    own(config)
    return
  common.check_config(config)
  common.setup_runtime(config)
  with config.unlocked():
    if FLAGS.checkpoint:
      config.checkpoint = FLAGS.checkpoint
    if FLAGS.vae:
      config.tokenizer.vae = FLAGS.vae
    if FLAGS.temperature is not None:
      config.sampling.temperature = FLAGS.temperature
    if FLAGS.cache is not None:
      config.sampling.cache = FLAGS.cache
  batch_size = DEFAULT_BATCH_SIZE if FLAGS.batch_size is None else FLAGS.batch_size
  seed = 0 if FLAGS.seed is None else FLAGS.seed
  if _system_bench(config, batch_size=batch_size, seed=seed):
    return
  runs = DEFAULT_RUNS if FLAGS.runs is None else FLAGS.runs
  try:
    specs = [RunSpec.parse(t) for t in runs.split(',') if t]
  except ValueError as e:
    raise common.CliError(str(e)) from None
  if not specs:
    raise common.CliError('--runs is empty')
  if batch_size < 1 or FLAGS.repeats < 1:
    raise common.CliError('--batch_size and --repeats must be >= 1')
  dtypes = [d for d in (FLAGS.dtypes or '').split(',') if d] or None
  for d in dtypes or []:
    if d not in ('float32', 'bfloat16'):
      raise common.CliError(f'--dtypes entries must be float32 or bfloat16, got {d!r}')
  log = _logger()
  result = benchmark(config, specs, batch_size=batch_size, dtypes=dtypes,
                     repeats=FLAGS.repeats, phases=FLAGS.phases,
                     calibrate=FLAGS.calibrate, with_torch=FLAGS.torch,
                     seed=seed, cfg=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule,
                     torch_threads=FLAGS.torch_threads, quality=FLAGS.quality, log=log)

  def table(result):
    for res in result.get('results', [result]):
      print(format_table(res))
    if 'precision' in result:
      print('precision vs ' + (dtypes or ['float32'])[0] + ': ' + json.dumps(result['precision']))

  _report(result, table)


def _logger():
  import jax

  if jax.process_index() != 0:
    return lambda m: None
  if FLAGS.json:
    return lambda m: print(m, file=sys.stderr, flush=True)
  return print


def _report(result, table) -> None:
  import jax

  result['command'] = ' '.join(['disa-bench'] + sys.argv[1:])
  if jax.process_index() != 0:   # every process ran the same timed work; one reports
    return
  if FLAGS.json_out:
    common.write_json(FLAGS.json_out, result)
  if FLAGS.json:
    print(json.dumps(result, indent=2, sort_keys=True))
  else:
    table(result)


def _system_bench(config, *, batch_size: int, seed: int) -> bool:
  """Systems with their own comparison run it here: `disa_jax.systems.<name>.bench.disa_bench(
  config, *, batch_size, seed, log, ...)` (FlowAR: baseline vs DiSA per scale; Harmon: the
  baseline vs the three DiSA settings with the phase split). The generic flags the user gave
  are passed by name when the function takes them (`--torch` as `with_torch`); a given flag it
  does not take is a one-line error."""
  import importlib
  import inspect

  from disa_jax.systems.base import system_of

  name = system_of(config).name
  if name == 'mar':
    return False
  try:
    module = importlib.import_module(f'disa_jax.systems.{name}.bench')
  except ModuleNotFoundError:
    return False
  if not hasattr(module, 'disa_bench'):
    return False
  if batch_size < 1 or FLAGS.repeats < 1:
    raise common.CliError('--batch_size and --repeats must be >= 1')
  params = inspect.signature(module.disa_bench).parameters
  kwargs = {'batch_size': batch_size, 'seed': seed}
  for flag, kw in _SYSTEM_BENCH_FLAGS.items():
    if FLAGS[flag].present:
      if kw not in params:
        raise common.CliError(f'--{flag} is not available for {name} in disa-bench; drop it')
      kwargs[kw] = FLAGS[flag].value
  result = module.disa_bench(config, log=_logger(), **kwargs)
  _report(result, lambda res: print(module.format_table(res)))
  return True


# Generic disa-bench flags -> keyword of a system's own `disa_bench`.
_SYSTEM_BENCH_FLAGS = {'runs': 'runs', 'repeats': 'repeats', 'phases': 'phases', 'cfg': 'cfg',
                       'torch': 'with_torch', 'torch_threads': 'torch_threads',
                       'dtypes': 'dtypes', 'quality': 'quality', 'cfg_schedule': 'cfg_schedule',
                       'calibrate': 'calibrate'}


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
