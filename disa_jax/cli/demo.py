"""disa-demo: the original MAR schedule vs DiSA on a bundled model, side by side.

  disa-demo                                   # 100 images (10 per class), seed 0
  disa-demo --bundled=mnist                   # the MNIST model, once it is shipped
  disa-demo --num-images=200 --seed=3 --out=outputs/demo3 --overwrite
  disa-demo --systems=                        # MAR only (no FlowAR / xAR panels)

All schedules sample the same classes with the same seed (same generation orders and
initial noise per image): MAR = the original schedule, a fixed number of diffusion steps at
every AR step (--mar-steps, default 100, no timestep clamp); MAR+clamp = the same steps with
DiSA's timestep clamp at 950; DiSA = linear --disa-upper -> --disa-lower (50 -> 5) with the
950 clamp. Speedups are relative to MAR. Compilation is reported separately (it happens in
the first call of each step plan); ms/image is sampling only. Quality comes from the
embedded classifier of the model's dataset (`disa_jax.eval.digits_quality`,
`disa_jax.eval.mnist_quality`): accuracy w.r.t. the requested class and the Frechet distance
to the held-out real digits in its feature space.

Writes <out>/grid.png (one labelled panel per schedule, one row per class, digits upscaled
2x; one row of panels per system) and <out>/metrics.json. A progress bar (stderr) follows the
AR steps while sampling.

With the digits model, the bundled FlowAR and xAR digits models (`configs/flowar/digits.py`,
`configs/xar/digits.py`) add two panels each, their official schedule and DiSA (their configs'
`baseline` / `disa` presets; speedups relative to their own official schedule), sampled for
the same classes and scored by the same classifier (--systems= for MAR only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
cli_flags.define_model()
cli_flags.define_out()           # default outputs/demo
cli_flags.define_sampling()
cli_flags.define_mar_steps()     # one count here, default 100
flags.DEFINE_integer('disa_upper', 50, 'DiSA: steps at the first AR step.')
flags.DEFINE_integer('disa_lower', 5, 'DiSA: steps at the last AR step.')
cli_flags.define_progress()
flags.DEFINE_enum('bundled', None, ['mnist', 'digits'],
                  'Which bundled model to run (default: DEFAULT_BUNDLED).')
flags.DEFINE_list('systems', None,
                  'Other systems whose bundled digits models run beside MAR (official schedule '
                  'vs DiSA): any of FlowAR, xAR (default: both); --systems= for MAR only.')
cli_flags.rule_validator('disa_upper', 'sampling', 'upper_steps')
cli_flags.rule_validator('disa_lower', 'sampling', 'lower_steps')

# Shared sampling flags the demo does not use (it runs its own three schedules).
_UNUSED = ('classes', 'preset', 'strategy', 'upper_steps', 'lower_steps', 'steps',
           'cfg_schedule', 'temperature', 'max_timestep')


# The other systems' bundled digits models, shown beside MAR when the demo runs the digits
# model: display name -> 'module:function' returning the model's config (its checkpoint in the
# package, its presets 'baseline' = the official schedule and 'disa'). A model missing from
# the package is skipped with a note.
OTHER_SYSTEMS: dict[str, str] = {
  'FlowAR': 'disa_jax.systems.flowar.config:digits_config',
  'xAR': 'disa_jax.systems.xar.config:digits_config',
}


def other_system_rows(labels, args, quality, print_fn=print) -> dict:
  """{'<system> <schedule>': (images, result)} of every system in OTHER_SYSTEMS whose bundled
  model is in the package (`bundled_system_rows`)."""
  rows = {}
  for system in args.systems:
    target = OTHER_SYSTEMS[system]
    got = bundled_system_rows(target, labels, args, quality)
    if got is None:
      if args.bundled == 'digits' and not args.checkpoint:
        print_fn(f'note: no bundled {system} digits model in this package; its rows are skipped')
      continue
    rows.update({f'{system} {name}': v for name, v in got.items()})
  return rows


# The bundled models the demo can run: name -> (config function in
# disa_jax.systems.mar.variants, quality metric in disa_jax.eval.quality).
BUNDLED = {'mnist': ('mnist_config', 'mnist'), 'digits': ('digits_config', 'digits')}
# The sklearn-digits model stays the default until the MNIST model (configs/mar/mnist.py) is
# trained and shipped in disa_jax/assets/mnist_mar (issue 16; see docs/benchmarks.md).
DEFAULT_BUNDLED = 'digits'


def bundled_config(name: str):
  from disa_jax.systems.mar import variants

  return getattr(variants, BUNDLED[name][0])()


@dataclasses.dataclass
class DemoArgs:
  """The demo's options (`disa-demo` flags)."""
  checkpoint: str | None = None
  num_images: int = 100
  batch_size: int = 100
  seed: int = 0
  num_iter: int | None = None
  cfg: float | None = None
  mar_steps: int = 100
  disa_upper: int = 50
  disa_lower: int = 5
  out: str = 'outputs/demo'
  overwrite: bool = False
  progress: bool = True
  bundled: str = DEFAULT_BUNDLED
  systems: tuple = tuple(OTHER_SYSTEMS)


def args_from_flags() -> DemoArgs:
  for name in _UNUSED:
    if getattr(FLAGS, name) is not None:
      raise common.CliError(f'--{name.replace("_", "-")} does not apply to disa-demo (it '
                            'compares fixed schedules; use disa-sample)')
  d = DemoArgs()
  mar_steps = d.mar_steps
  if FLAGS.mar_steps is not None:
    try:
      mar_steps = int(FLAGS.mar_steps)
    except ValueError:
      raise common.CliError('--mar-steps must be one integer for disa-demo, got '
                            f'{FLAGS.mar_steps!r}') from None
  systems = d.systems
  if FLAGS.systems is not None:
    known = {k.lower(): k for k in OTHER_SYSTEMS}
    bad = [x for x in FLAGS.systems if x.lower() not in known]
    if bad:
      raise common.CliError(f'--systems: unknown system {bad[0]!r}; choose from '
                            f'{", ".join(OTHER_SYSTEMS)} (or --systems= for MAR only)')
    systems = tuple(dict.fromkeys(known[x.lower()] for x in FLAGS.systems))
  return DemoArgs(
    systems=systems, checkpoint=FLAGS.checkpoint, out=FLAGS.out or d.out,
    overwrite=FLAGS.overwrite,
    num_images=d.num_images if FLAGS.num_images is None else FLAGS.num_images,
    batch_size=d.batch_size if FLAGS.batch_size is None else FLAGS.batch_size,
    seed=d.seed if FLAGS.seed is None else FLAGS.seed, num_iter=FLAGS.num_iter, cfg=FLAGS.cfg,
    mar_steps=mar_steps, disa_upper=FLAGS.disa_upper, disa_lower=FLAGS.disa_lower,
    progress=FLAGS.progress, bundled=FLAGS.bundled or d.bundled)


def demo(args, print_fn=print) -> dict:
  import jax

  from disa_jax.checkpoint import load_mar
  from disa_jax.diffusion.gaussian import DISA_MAX_TIMESTEP
  from disa_jax.engine import runner
  from disa_jax.eval.quality import get_quality_metric
  from disa_jax.io.output import OutputDir, write_json
  from disa_jax.schedules import resolve_steps
  from disa_jax.tokenizers.image import PixelTokenizer, make_grid

  config = bundled_config(args.bundled)
  s = config.sampling
  num_iter = s.num_iter if args.num_iter is None else args.num_iter
  cfg = s.cfg if args.cfg is None else args.cfg
  for name, flag, value in (('num_iter', 'num-iter', num_iter), ('cfg', 'cfg', cfg),
                            ('batch_size', 'batch-size', args.batch_size),
                            ('upper_steps', 'mar-steps', args.mar_steps),
                            ('upper_steps', 'disa-upper', args.disa_upper),
                            ('lower_steps', 'disa-lower', args.disa_lower)):
    cli_flags.check_sampling_value(name, value, flag)
  if args.num_images < 2:
    raise common.CliError(f'--num-images must be >= 2, got {args.num_images}')
  ckpt = args.checkpoint or config.checkpoint
  if not args.checkpoint and not os.path.isdir(ckpt):
    raise common.CliError(
      f'the bundled {args.bundled} model is not in this package ({ckpt}); train it with '
      f'disa-train --config=configs/mar/{args.bundled}.py --workdir=runs/{args.bundled} '
      f'--export={ckpt}, or pass --checkpoint=DIR')
  runs = {
    'MAR': resolve_steps(num_iter=num_iter, preset='mar', upper=args.mar_steps,
                         lower=args.mar_steps),
    # The same fixed steps with DiSA's timestep clamp: separates the two parts of DiSA.
    'MAR+clamp': resolve_steps(num_iter=num_iter, preset='mar', upper=args.mar_steps,
                               lower=args.mar_steps, max_timestep=DISA_MAX_TIMESTEP),
    'DiSA': resolve_steps(num_iter=num_iter, preset='disa', strategy='linear',
                          upper=args.disa_upper, lower=args.disa_lower),
  }
  with OutputDir(args.out, overwrite=args.overwrite, inputs=[ckpt]) as od:
    model = load_mar(ckpt, overrides={'attn_splits': 0})
    if not 1 <= num_iter <= model.config.seq_len:
      raise common.CliError(f'--num-iter must be in [1, {model.config.seq_len}] for this model, '
                            f'got {num_iter}')
    tok = PixelTokenizer(model.config, scale=config.tokenizer.scale)
    quality = get_quality_metric(BUNDLED[args.bundled][1])
    mesh = runner.make_mesh(config)
    runner.check_batch_size(args.batch_size, mesh, '--batch-size')
    if config.runtime.get('background_compile'):   # ms/image: nothing compiling behind it
      config = config.copy_and_resolve_references()
      config.runtime.background_compile = False
    sampler = runner.make_sampler(model, config, mesh)
    labels = runner.class_labels(args.num_images, [], model.config.class_num)
    key = jax.random.key(args.seed)
    extra = dict(cfg=cfg, cfg_schedule=s.cfg_schedule, temperature=s.temperature)
    images, results = sample_schedules(sampler, {n: (p, extra) for n, p in runs.items()},
                                       labels=labels, key=key, args=args, decode=tok.decode,
                                       num_stages=num_iter)
    # Scored after all timed sampling, so the evaluation's BLAS threads cannot slow it down.
    score_runs(results, images, labels, quality, base='MAR')
    for name, (imgs, r) in other_system_rows(labels, args, quality, print_fn).items():
      images[name], results[name] = imgs, r
    _write_grid(os.path.join(od.path, 'grid.png'), images, labels, make_grid,
                titles={n: panel_title(n, r) for n, r in results.items()})
    summary = {'checkpoint': str(ckpt), 'bundled': args.bundled,
               'metric': BUNDLED[args.bundled][1], 'num_images': args.num_images, 'seed': args.seed,
               'num_iter': num_iter, 'cfg': cfg, 'cfg_schedule': s.cfg_schedule,
               'backend': jax.default_backend(), 'runs': results}
    write_json(os.path.join(od.path, 'metrics.json'), summary)
  print_fn(format_table(summary))
  print_fn(f'wrote {od.final}/grid.png (panels: {", ".join(images)}) and metrics.json')
  return summary


def sample_schedules(sampler, runs: dict, *, labels, key, args, decode, num_stages: int):
  """({name: images}, {name: result}) of every schedule in `runs` ({name: (StepPlan, generate
  kwargs)}), with the same labels, key and per-image randomness; compilation (first call of a
  plan) is counted apart from the sampling time."""
  from disa_jax.engine import runner

  results, images = {}, {}
  for name, (plan, extra) in runs.items():
    compile_s = sample_s = 0.0
    out = []
    batches = range(0, args.num_images, args.batch_size)
    with _progress(len(batches) * num_stages, name, args.progress) as bar:
      for lo in batches:
        ids = np.arange(lo, min(lo + args.batch_size, args.num_images))
        tokens = runner.generate_checked(sampler, labels[ids], key, steps=plan.steps,
                                         max_timestep=plan.max_timestep, image_ids=ids,
                                         progress=lambda _k: bar.update(1), **extra)
        st = sampler.last_stats
        compile_s += st.compile_s
        sample_s += st.wall_s
        out.append(decode(tokens))
    images[name] = np.concatenate(out)
    report = st.plan.report()
    results[name] = {
      'steps_requested': report['steps_requested'], 'steps_actual': report['steps_actual'],
      'max_timestep': plan.max_timestep,
      'head_token_steps_per_image': report['head_token_steps_per_image'],
      'compile_s': compile_s, 'sample_s': sample_s,
      'ms_per_image': 1000 * sample_s / args.num_images,
    }
  return images, results


def score_runs(results: dict, images: dict, labels, quality, *, base: str) -> None:
  """Adds accuracy / FD (after all timed sampling, so the evaluation's BLAS threads cannot slow
  it down) and the speedup w.r.t. run `base` to every result."""
  for name in results:
    results[name].update(quality.evaluate(images[name], labels))
  base_s = results[base]['sample_s']
  for r in results.values():
    r['speedup'] = base_s / r['sample_s'] if r['sample_s'] > 0 else None


def bundled_system_rows(config_fn: str, labels, args, quality) -> dict | None:
  """{schedule: (images, result)} of a bundled FlowAR / xAR digits model: its official
  schedule ('baseline' preset) and DiSA ('disa' preset, at the config's DiSA cfg), None when
  the demo's dataset is not digits or the model is not in the package."""
  import importlib

  import jax

  from disa_jax.engine import runner
  from disa_jax.systems.base import system_of

  if args.bundled != 'digits':
    return None
  module, fn = config_fn.split(':')
  config = getattr(importlib.import_module(module), fn)()
  if args.checkpoint or not os.path.isdir(config.checkpoint):
    return None
  model, _ = runner.build_model(config)
  decoder = runner.build_decoder(config, model)
  mesh = runner.make_mesh(config)
  runner.check_batch_size(args.batch_size, mesh, '--batch-size')
  sampler = runner.make_sampler(model, config, mesh)
  s = config.sampling
  runs = {}
  for name, preset, cfg in (('official', 'baseline', s.get('baseline_cfg', s.cfg)),
                            ('DiSA', 'disa', s.cfg)):
    sampling = s.copy_and_resolve_references()
    sampling.preset = preset
    runs[name] = (runner.step_plan(sampling, system_of(config)), {'cfg': cfg})
  num_stages = len(runs['DiSA'][0].steps)
  images, results = sample_schedules(sampler, runs, labels=labels, key=jax.random.key(args.seed),
                                     args=args, decode=decoder.decode, num_stages=num_stages)
  for name, (_, extra) in runs.items():
    results[name]['cfg'] = extra['cfg']
  score_runs(results, images, labels, quality, base='official')
  return {name: (images[name], results[name]) for name in runs}


class _NoBar:
  def update(self, n=1):
    pass


@contextlib.contextmanager
def _progress(total: int, name: str, enabled: bool):
  """A tqdm bar over AR steps on stderr (nothing when disabled)."""
  if not enabled:
    yield _NoBar()
    return
  from tqdm import tqdm

  with tqdm(total=total, desc=f'sampling {name}', unit='AR step', leave=False) as bar:
    yield bar


def panel_title(name: str, r: dict) -> str:
  return (f'{name}: {_steps_text(r)} steps\n'
          f'acc {r["accuracy"]:.2f}  FD {r["fd"]:.1f}  {r["ms_per_image"]:.0f} ms/img')


UPSCALE = 2


def system_of_run(name: str) -> str:
  """'MAR' for MAR's schedules, else the system in front of the schedule ('FlowAR DiSA')."""
  first = name.split()[0]
  return first if first in OTHER_SYSTEMS else 'MAR'


PANEL_GAP = 12      # grey bar between panels of a row
TITLE_H = 44        # title band above each row of panels


def _write_grid(path, images, labels, make_grid, titles=None):
  """One labelled panel per schedule (rows = classes, digits upscaled); one row of panels per
  system (MAR, then FlowAR, xAR), each row under its own title band."""
  from PIL import Image, ImageDraw, ImageFont

  order = np.argsort(labels, kind='stable')
  per_class = int(np.bincount(labels).max())
  panels = {name: make_grid(imgs[order].repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2),
                            ncol=min(per_class, 10))
            for name, imgs in images.items()}
  h = max(x.shape[0] for x in panels.values())
  width = max(260, *(p.shape[1] for p in panels.values()))   # room for the two title lines
  rows = {}
  for name in images:
    rows.setdefault(system_of_run(name), []).append(name)
  cols = max(len(r) for r in rows.values())
  canvas = Image.new('RGB', (cols * width + (cols - 1) * PANEL_GAP, len(rows) * (h + TITLE_H)),
                     'white')
  draw = ImageDraw.Draw(canvas)
  try:
    font = ImageFont.load_default(size=14)
  except TypeError:  # Pillow without FreeType sizes
    font = ImageFont.load_default()
  for r, names in enumerate(rows.values()):
    y = r * (h + TITLE_H)
    for c, name in enumerate(names):
      x = c * (width + PANEL_GAP)
      if c:
        canvas.paste((128, 128, 128), (x - PANEL_GAP, y + TITLE_H, x, y + TITLE_H + h))
      canvas.paste(Image.fromarray(panels[name]), (x, y + TITLE_H))
      draw.multiline_text((x + 4, y + 4), (titles or {}).get(name, name), fill='black',
                          font=font, spacing=4)
  canvas.save(path)


def _steps_text(r: dict) -> str:
  st = r['steps_requested']
  steps = f'{st[0]}' if len(set(st)) == 1 else f'{st[0]}->{st[-1]}'
  if r['max_timestep'] is not None:
    steps += f' (clamp {r["max_timestep"]})'
  return steps


def format_table(summary: dict) -> str:
  rows = [('schedule', 'diffusion steps', 'ms/image', 'speedup', 'accuracy', 'FD', 'compile s',
           'head token-steps')]
  for name, r in summary['runs'].items():
    rows.append((name, _steps_text(r), f'{r["ms_per_image"]:.1f}', f'{r["speedup"]:.2f}x',
                 f'{r["accuracy"]:.3f}', f'{r["fd"]:.2f}', f'{r["compile_s"]:.1f}',
                 f'{r["head_token_steps_per_image"]}'))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  runs = summary['runs']
  note = ''
  if 'MAR+clamp' in runs and runs['MAR']['accuracy'] < runs['MAR+clamp']['accuracy'] - 0.1:
    note = ('note: without the clamp the first diffusion step starts at t=999 (abar 2.4e-9), '
            'where the posterior mean moves ~300x the head\'s eps error; this head is not '
            'precise enough there (see docs/benchmarks.md), the clamp of DiSA avoids it.')
  lines = [f'{summary["num_images"]} images, seed {summary["seed"]}, K={summary["num_iter"]} '
           f'AR steps, cfg {summary["cfg"]} ({summary["cfg_schedule"]}), '
           f'{summary["backend"]} (compile time excluded from ms/image)']
  for i, row in enumerate(rows):
    lines.append('  '.join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if i == 0:
      lines.append('  '.join('-' * w for w in widths))
  if note:
    lines.append(note)
  return '\n'.join(lines)


def _run(argv):
  if len(argv) > 1:
    raise common.CliError(f'unexpected argument {argv[1]!r} (disa-demo takes only flags)')
  args = args_from_flags()
  common.setup_runtime(bundled_config(args.bundled))
  demo(args)


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
