"""disa-demo: the original MAR schedule vs DiSA on the bundled digits model, side by side.

  disa-demo                                   # 100 images (10 per class), seed 0
  disa-demo --num-images=200 --seed=3 --out=outputs/demo3 --overwrite

All schedules sample the same classes with the same seed (same generation orders and
initial noise per image): MAR = the original schedule, a fixed number of diffusion steps at
every AR step (--mar-steps, default 100, no timestep clamp); MAR+clamp = the same steps with
DiSA's timestep clamp at 950; DiSA = linear --disa-upper -> --disa-lower (50 -> 5) with the
950 clamp. Speedups are relative to MAR. Compilation runs first and is reported separately; the timed
part is sampling only. Quality comes from the embedded digits classifier
(`disa_jax.eval.digits_quality`): accuracy w.r.t. the requested class and the Frechet
distance to held-out real digits in its feature space.

Writes <out>/grid.png (one panel per schedule, one row per class) and <out>/metrics.json.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

cli_flags.define_model()
cli_flags.define_out()           # default outputs/demo
cli_flags.define_sampling()
cli_flags.define_mar_steps()     # one count here, default 100
flags.DEFINE_integer('disa_upper', 50, 'DiSA: steps at the first AR step.')
flags.DEFINE_integer('disa_lower', 5, 'DiSA: steps at the last AR step.')
cli_flags.rule_validator('disa_upper', 'sampling', 'upper_steps')
cli_flags.rule_validator('disa_lower', 'sampling', 'lower_steps')
FLAGS = flags.FLAGS

# Shared sampling flags the demo does not use (it runs its own three schedules).
_UNUSED = ('classes', 'preset', 'strategy', 'upper_steps', 'lower_steps', 'steps',
           'cfg_schedule', 'temperature', 'max_timestep')


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
  return DemoArgs(
    checkpoint=FLAGS.checkpoint, out=FLAGS.out or d.out, overwrite=FLAGS.overwrite,
    num_images=d.num_images if FLAGS.num_images is None else FLAGS.num_images,
    batch_size=d.batch_size if FLAGS.batch_size is None else FLAGS.batch_size,
    seed=d.seed if FLAGS.seed is None else FLAGS.seed, num_iter=FLAGS.num_iter, cfg=FLAGS.cfg,
    mar_steps=mar_steps, disa_upper=FLAGS.disa_upper, disa_lower=FLAGS.disa_lower)


def demo(args, print_fn=print) -> dict:
  import jax

  from disa_jax.checkpoint import load_mar
  from disa_jax.diffusion.gaussian import DISA_MAX_TIMESTEP
  from disa_jax.engine import runner
  from disa_jax.eval.digits_quality import DigitsQuality
  from disa_jax.io.output import OutputDir, write_json
  from disa_jax.schedules import resolve_steps
  from disa_jax.systems.mar.variants import digits_config
  from disa_jax.tokenizers.image import PixelTokenizer, make_grid

  config = digits_config()
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
    quality = DigitsQuality()
    mesh = runner.make_mesh(config)
    runner.check_batch_size(args.batch_size, mesh, '--batch-size')
    sampler = runner.make_sampler(model, config, mesh)
    labels = runner.class_labels(args.num_images, [], model.config.class_num)
    key = jax.random.key(args.seed)
    results, images = {}, {}
    for name, plan in runs.items():
      compile_s = sample_s = 0.0
      out = []
      for lo in range(0, args.num_images, args.batch_size):
        ids = np.arange(lo, min(lo + args.batch_size, args.num_images))
        tokens = runner.generate_checked(sampler, labels[ids], key, steps=plan.steps,
                                  max_timestep=plan.max_timestep, cfg=cfg,
                                  cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                  image_ids=ids)
        st = sampler.last_stats
        compile_s += st.compile_s
        sample_s += st.wall_s
        out.append(tok.decode(tokens))
      images[name] = np.concatenate(out)
      report = st.plan.report()
      results[name] = {
        'steps_requested': report['steps_requested'], 'steps_actual': report['steps_actual'],
        'max_timestep': plan.max_timestep,
        'head_token_steps_per_image': report['head_token_steps_per_image'],
        'compile_s': compile_s, 'sample_s': sample_s,
        'ms_per_image': 1000 * sample_s / args.num_images,
      }
    # Scored after all timed sampling, so the evaluation's BLAS threads cannot slow it down.
    for name in runs:
      results[name].update(quality.evaluate(images[name], labels))
    base = results['MAR']['sample_s']
    for r in results.values():
      r['speedup'] = base / r['sample_s'] if r['sample_s'] > 0 else None
    _write_grid(os.path.join(od.path, 'grid.png'), images, labels, make_grid)
    summary = {'checkpoint': str(ckpt), 'num_images': args.num_images, 'seed': args.seed,
               'num_iter': num_iter, 'cfg': cfg, 'cfg_schedule': s.cfg_schedule,
               'backend': jax.default_backend(), 'runs': results}
    write_json(os.path.join(od.path, 'metrics.json'), summary)
  print_fn(format_table(summary))
  print_fn(f'wrote {od.final}/grid.png (panels: {", ".join(runs)}) and metrics.json')
  return summary


def _write_grid(path, images, labels, make_grid):
  """One panel per schedule (rows = classes), separated by grey bars."""
  from PIL import Image

  order = np.argsort(labels, kind='stable')
  per_class = int(np.bincount(labels).max())
  panels = [make_grid(imgs[order].repeat(2, axis=1).repeat(2, axis=2), ncol=min(per_class, 10))
            for imgs in images.values()]
  h = max(x.shape[0] for x in panels)
  bar = np.full((h, 8, 3), 128, np.uint8)
  parts = []
  for i, panel in enumerate(panels):
    if i:
      parts.append(bar)
    parts.append(np.pad(panel, ((0, h - panel.shape[0]), (0, 0), (0, 0)), constant_values=255))
  Image.fromarray(np.concatenate(parts, axis=1)).save(path)


def format_table(summary: dict) -> str:
  rows = [('schedule', 'diffusion steps', 'ms/image', 'speedup', 'accuracy', 'FD', 'compile s')]
  for name, r in summary['runs'].items():
    st = r['steps_requested']
    steps = f'{st[0]}' if len(set(st)) == 1 else f'{st[0]}->{st[-1]}'
    if r['max_timestep'] is not None:
      steps += f' (clamp {r["max_timestep"]})'
    rows.append((name, steps, f'{r["ms_per_image"]:.1f}', f'{r["speedup"]:.2f}x',
                 f'{r["accuracy"]:.3f}', f'{r["fd"]:.2f}', f'{r["compile_s"]:.1f}'))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  runs = summary['runs']
  note = ''
  if 'MAR+clamp' in runs and runs['MAR']['accuracy'] < runs['MAR+clamp']['accuracy'] - 0.1:
    note = ('note: without the clamp the first diffusion step starts at t=999 (abar 2.4e-9), '
            'where x0 = (x - sqrt(1-abar) eps) / sqrt(abar) amplifies eps errors ~2e4 times; this '
            'small, briefly trained head is not precise enough there, the clamp of DiSA avoids it.')
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
  from disa_jax.systems.mar.variants import digits_config

  if len(argv) > 1:
    raise common.CliError(f'unexpected argument {argv[1]!r} (disa-demo takes only flags)')
  args = args_from_flags()
  common.setup_runtime(digits_config())
  demo(args)


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
