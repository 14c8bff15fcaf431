"""disa-bench: MAR baseline(s) and DiSA side by side, in one process, on one model and batch.

  disa-bench --config=configs/mar_base.py --batch-size=4 --json
  disa-bench --config=configs/mar_base.py:cpu --runs=mar64=mar:64:100,disa64=disa:64:50:5 \\
      --torch --phases

Each run is `label=preset:num_iter:upper[:lower[:strategy]]`. Compilation happens before the
timed repeats and is reported separately. For every run the table shows sampling wall time,
images/s, head token-steps per image, compilations, padding waste, the measured speedup over
the first run and the speedup predicted from counted FLOPs. `--phases` adds a synchronised
pass that splits time into backbone and head; `--torch` runs the PyTorch reference
(`disa_jax.reference.torch_mar`, same weights, same batch, same schedule) for the ratio.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from absl import flags
from ml_collections import config_flags

from disa_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/mar_base.py.', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Model directory; default random weights.')
flags.DEFINE_integer('batch_size', 4, 'Batch size (images per run).')
flags.DEFINE_string('runs', 'mar256=mar:256:100,mar64=mar:64:100,disa64=disa:64:50:5:linear',
                    'Comma-separated runs label=preset:num_iter:upper[:lower[:strategy]]; '
                    'the first is the baseline.')
flags.DEFINE_integer('repeats', 1, 'Timed repeats per run (the minimum is reported).')
flags.DEFINE_bool('phases', False, 'Extra synchronised pass timing backbone and head.')
flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference on the same weights.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: leave the default).')
flags.DEFINE_float('cfg', None, 'Guidance scale (default: config.sampling.cfg).')
flags.DEFINE_string('cfg_schedule', None, 'linear or constant.')
flags.DEFINE_integer('seed', 0, 'Seed for weights, labels and sampling.')
flags.DEFINE_bool('json', False, 'Print the result as JSON only.')
flags.DEFINE_string('json_out', None, 'Also write the JSON result to this file.')

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class RunSpec:
  label: str
  preset: str
  num_iter: int
  upper: int
  lower: int
  strategy: str

  @classmethod
  def parse(cls, text: str) -> RunSpec:
    label, eq, body = text.partition('=')
    if not eq:
      body, label = label, label.replace(':', '_')
    parts = body.split(':')
    if len(parts) < 3 or parts[0] not in ('mar', 'disa'):
      raise common.CliError(
        f'bad run spec {text!r}; expected label=preset:num_iter:upper[:lower[:strategy]] with '
        'preset mar or disa, e.g. disa64=disa:64:50:5:linear')
    try:
      num_iter, upper = int(parts[1]), int(parts[2])
      lower = int(parts[3]) if len(parts) > 3 else upper
    except ValueError:
      raise common.CliError(f'bad run spec {text!r}: num_iter/upper/lower must be ints') from None
    strategy = parts[4] if len(parts) > 4 else ('constant' if parts[0] == 'mar' else 'linear')
    return cls(label, parts[0], num_iter, upper, lower, strategy)

  def step_plan(self):
    from disa_jax.schedules import resolve_steps

    return resolve_steps(num_iter=self.num_iter, preset=self.preset, strategy=self.strategy,
                         upper=self.upper, lower=self.lower)


def benchmark(config, specs: list[RunSpec], *, batch_size: int, repeats: int = 1,
              phases: bool = False, with_torch: bool = False, seed: int = 0,
              cfg: float | None = None, cfg_schedule: str | None = None, torch_threads: int = 0,
              log=print) -> dict:
  import jax
  import numpy as np

  from disa_jax import runner
  from disa_jax.sampler.plan import mask_schedule, plan_flops

  cfg = config.sampling.cfg if cfg is None else cfg
  cfg_schedule = cfg_schedule or config.sampling.cfg_schedule
  plans = [s.step_plan() for s in specs]                       # validate before loading
  model, source = runner.build_model(config, seed=seed)
  for s in specs:
    mask_schedule(s.num_iter, model.config.seq_len)
  mesh = runner.make_mesh(config)
  sampler = runner.make_sampler(model, config, mesh)
  labels = np.arange(batch_size) % model.config.class_num
  key = jax.random.key(seed)
  result = {
    'config': config.get('name', ''), 'model': source, 'batch_size': batch_size, 'cfg': cfg,
    'cfg_schedule': cfg_schedule, 'temperature': config.sampling.temperature,
    'backend': jax.default_backend(), 'devices': jax.device_count(),
    'device_kind': jax.devices()[0].device_kind, 'repeats': repeats, 'runs': [],
  }
  torch_model = _torch_model(model, torch_threads) if with_torch else None
  for spec, sp in zip(specs, plans, strict=True):
    kw = dict(steps=sp.steps, max_timestep=sp.max_timestep, cfg=cfg, cfg_schedule=cfg_schedule,
              temperature=config.sampling.temperature)
    plan = sampler.plan(batch_size, steps=sp.steps, max_timestep=sp.max_timestep, cfg=cfg,
                        cfg_schedule=cfg_schedule)
    log(f'[{spec.label}] compiling {len(plan.backbone_buckets)} backbone + '
        f'{len(plan.head_buckets)} head buckets ...')
    t0 = time.perf_counter()
    compile_s = sampler.compile(plan)
    log(f'[{spec.label}] compiled in {compile_s:.1f} s ({time.perf_counter() - t0:.1f} s)')
    walls = []
    for r in range(repeats):
      sampler.generate(labels, key, **kw)
      walls.append(sampler.last_stats.wall_s)
      log(f'[{spec.label}] run {r + 1}/{repeats}: {walls[-1]:.2f} s')
    wall = min(walls)
    official = plan_flops(model.config, plan, official=True)
    executed = plan_flops(model.config, plan, official=False)
    row = {
      'label': spec.label, 'preset': spec.preset, 'num_iter': spec.num_iter,
      'strategy': spec.strategy, 'upper_steps': spec.upper, 'lower_steps': spec.lower,
      'max_timestep': sp.max_timestep,
      'wall_s': round(wall, 4), 'wall_s_all': [round(w, 4) for w in walls],
      's_per_image': round(wall / batch_size, 4),
      'images_per_s': round(batch_size / wall, 5),
      'compile_s': round(compile_s, 3),
      'compilations': {'backbone': len(plan.backbone_buckets), 'head': len(plan.head_buckets)},
      'head_token_steps_per_image': plan.head_token_steps(),
      'head_token_steps_per_image_padded': plan.head_token_steps(padded=True),
      'head_padding_waste': round(plan.head_waste(), 4),
      'encoder_padding_waste': round(plan.encoder_waste(), 4),
      'tflop_per_image': {k: round(v / 1e12, 4) for k, v in official.items()},
      'tflop_per_image_executed': {k: round(v / 1e12, 4) for k, v in executed.items()},
      'tflop_per_s': round(executed['total'] * batch_size / wall / 1e12, 4),
    }
    if phases:
      sampler.generate(labels, key, timed=True, **kw)
      st = sampler.last_stats
      row['phases'] = {'backbone_s': round(st.backbone_s, 3), 'head_s': round(st.head_s, 3),
                       'backbone_s_per_image': round(st.backbone_s / batch_size, 3),
                       'head_s_per_image': round(st.head_s / batch_size, 3)}
      log(f'[{spec.label}] phases: backbone {st.backbone_s:.2f} s, head {st.head_s:.2f} s')
    if torch_model is not None:
      row['torch'] = _torch_run(torch_model, labels, spec, sp, cfg, cfg_schedule,
                                config.sampling.temperature, batch_size, seed)
      row['torch']['jax_over_torch'] = round(wall / row['torch']['wall_s'], 4)
      log(f'[{spec.label}] torch reference: {row["torch"]["wall_s"]:.2f} s '
          f'(jax/torch = {row["torch"]["jax_over_torch"]:.3f})')
    result['runs'].append(row)
  base = result['runs'][0]
  for row in result['runs']:
    row['speedup'] = round(base['wall_s'] / row['wall_s'], 4)
    row['flop_speedup'] = round(base['tflop_per_image']['total'] / row['tflop_per_image']['total'],
                                4)
    row['speedup_over_flop_prediction'] = round(row['speedup'] / row['flop_speedup'], 4)
    if 'torch' in row and 'torch' in base:
      row['torch']['speedup'] = round(base['torch']['wall_s'] / row['torch']['wall_s'], 4)
  return result


def _torch_model(model, threads: int):
  import torch

  from disa_jax.convert.mapping import flax_state_to_torch
  from disa_jax.reference.torch_mar import TorchMAR

  if threads:
    torch.set_num_threads(threads)
  tm = TorchMAR(model.config).eval()
  from flax import nnx

  sd = flax_state_to_torch(nnx.state(model, nnx.Param))
  tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  return tm


def _torch_run(tm, labels, spec, sp, cfg, cfg_schedule, temperature, batch_size, seed):
  import numpy as np
  import torch

  from disa_jax.reference.torch_mar import sample_tokens

  np.random.seed(seed)
  torch.manual_seed(seed)
  timings = {}
  t0 = time.perf_counter()
  sample_tokens(tm, batch_size, num_iter=spec.num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                labels=labels, temperature=temperature, steps=list(sp.steps),
                clip=sp.max_timestep, timings=timings)
  wall = time.perf_counter() - t0
  return {'wall_s': round(wall, 4), 's_per_image': round(wall / batch_size, 4),
          'backbone_s': round(timings.get('backbone', 0.0), 3),
          'head_s': round(timings.get('head', 0.0), 3), 'threads': torch.get_num_threads()}


def format_table(result: dict) -> str:
  cols = [('run', 'label', '{}'), ('K', 'num_iter', '{}'), ('steps', None, None),
          ('s/img', 's_per_image', '{:.3f}'), ('img/s', 'images_per_s', '{:.4f}'),
          ('head tok-steps', 'head_token_steps_per_image', '{}'),
          ('compiles b/h', None, None), ('pad waste h/e', None, None),
          ('speedup', 'speedup', '{:.2f}x'), ('FLOP pred.', 'flop_speedup', '{:.2f}x')]
  lines = []
  header = [c[0] for c in cols]
  rows = []
  for r in result['runs']:
    cells = []
    for title, key, fmt in cols:
      if title == 'steps':
        cells.append(f'{r["preset"]} {r["upper_steps"]}' + (
          f'->{r["lower_steps"]} {r["strategy"]}' if r['preset'] == 'disa' else ''))
      elif title == 'compiles b/h':
        cells.append(f'{r["compilations"]["backbone"]}/{r["compilations"]["head"]}')
      elif title == 'pad waste h/e':
        cells.append(f'{r["head_padding_waste"]:.1%}/{r["encoder_padding_waste"]:.1%}')
      else:
        cells.append(fmt.format(r[key]))
    if 'torch' in r:
      cells.append(f'{r["torch"]["s_per_image"]:.3f}')
      cells.append(f'{r["torch"]["jax_over_torch"]:.3f}')
    rows.append(cells)
  if any('torch' in r for r in result['runs']):
    header += ['torch s/img', 'jax/torch']
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
  fmt_row = lambda cells: '  '.join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa
  lines.append(f'{result["config"]} | {result["model"]} | batch {result["batch_size"]} | '
               f'cfg {result["cfg"]} {result["cfg_schedule"]} | {result["backend"]} '
               f'x{result["devices"]} ({result["device_kind"]})')
  lines.append(fmt_row(header))
  lines.extend(fmt_row(r) for r in rows)
  return '\n'.join(lines)


def _run(argv):
  del argv
  config = _CONFIG.value
  common.check_config(config)
  common.setup_runtime(config)
  with config.unlocked():
    if FLAGS.checkpoint:
      config.checkpoint = FLAGS.checkpoint
  specs = [RunSpec.parse(t) for t in FLAGS.runs.split(',') if t]
  if not specs:
    raise common.CliError('--runs is empty')
  if FLAGS.batch_size < 1 or FLAGS.repeats < 1:
    raise common.CliError('--batch_size and --repeats must be >= 1')
  log = (lambda m: print(m, file=sys.stderr, flush=True)) if FLAGS.json else print
  result = benchmark(config, specs, batch_size=FLAGS.batch_size, repeats=FLAGS.repeats,
                     phases=FLAGS.phases, with_torch=FLAGS.torch, seed=FLAGS.seed,
                     cfg=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule,
                     torch_threads=FLAGS.torch_threads, log=log)
  result['command'] = ' '.join(['disa-bench'] + sys.argv[1:])
  if FLAGS.json_out:
    common.write_json(FLAGS.json_out, result)
  if FLAGS.json:
    print(json.dumps(result, indent=2, sort_keys=True))
  else:
    print(format_table(result))


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
