"""disa-evidence: the DiSA paper's measurements on any MAR model, as JSON + PNG figures.

  disa-evidence variance straightness --config=configs/digits.py --out=docs/evidence
  disa-evidence predictability --config=configs/digits.py --num-images=500 --out=docs/evidence
  disa-evidence curves --config=configs/digits.py --metric=digits --out=docs/evidence
  disa-evidence curves --config=configs/mar_base.py --checkpoint=ckpt/mar_base --vae=ckpt/kl16 \\
      --metric=inception --inception=ckpt/inception --ref-stats=VIRTUAL_imagenet256_labeled.npz \\
      --num-images=10000 --batch-size=256 --out=outputs/curves_mar_base
  disa-evidence all --config=configs/mar_base.py:cpu --out=outputs/evidence_cpu   # smoke test

Commands (any subset, or `all`):
  variance        per-AR-step sampling variance of the next tokens (context fixed, --samples
                  head draws per token, --probe-steps diffusion steps)
  straightness    per-AR-step straightness of the denoising paths (mean step-vs-chord cosine)
  predictability  held-out error of a small MLP predicting each final token from its condition z
  curves          generation time per image (and counted head evaluations) vs quality for MAR
                  with constant step counts (--mar-steps) and DiSA linear / cosine / two-stage
                  (--runs overrides: label=preset:num_iter:upper[:lower[:strategy]], ...)
The generation runs use the config's sampling settings and the schedule flags of disa-sample
(--preset, --num-iter, --cfg, ...). Each command writes NAME.json and NAME.png into --out
(existing files are kept unless --overwrite). Single host.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config()
cli_flags.define_model()
cli_flags.define_output()
cli_flags.define_sampling()
cli_flags.define_metric()

COMMANDS = ('variance', 'straightness', 'predictability', 'curves')

flags.DEFINE_integer('samples', 100, 'Head draws (variance) / trajectories (straightness) per '
                     'token.')
flags.DEFINE_integer('straightness_samples', 8, 'Trajectories per token for straightness.')
flags.DEFINE_integer('probe_steps', 50, 'Diffusion steps of the variance / straightness probes '
                     '(the same at every AR step).')
flags.DEFINE_integer('mlp_steps', 3000, 'Training steps of the predictability MLP.')
flags.DEFINE_integer('mlp_hidden', 256, 'Hidden width of the predictability MLP.')
flags.DEFINE_float('holdout', 0.2, 'Fraction of images held out for the predictability error.')
cli_flags.define_runs()         # curves: default --mar_steps runs + the three DiSA strategies
cli_flags.define_mar_steps()    # curves: default 5,10,25,50,100
FLAGS = flags.FLAGS
DEFAULT_MAR_STEPS = '5,10,25,50,100'


def _default_images(command: str, class_num: int) -> int:
  return {'variance': 32, 'straightness': 32, 'predictability': 256}.get(command, 50 * class_num)


def _labels(num_images: int, config, class_num: int):
  """The evaluation order (class blocks) when it divides evenly, else classes cycled."""
  from disa_jax.engine import runner

  classes = common.parse_int_list(config.sampling.classes, '--classes')
  order = 'blocks' if not classes and num_images % class_num == 0 else 'cycle'
  return runner.class_labels(num_images, classes, class_num, order=order)


def run_commands(config, commands: list[str], out: str, *, overwrite=False) -> dict:
  import jax

  from disa_jax.engine import runner
  from disa_jax.eval import evidence, plots
  from disa_jax.eval.curves import RunSpec, RunSpecError, default_runs
  from disa_jax.systems.base import system_of

  if jax.process_count() > 1:
    raise common.CliError('disa-evidence runs on a single host; start it on one process')
  cli_flags.validate_sampling(config)
  plan = runner.step_plan(config)
  s = config.sampling
  from disa_jax.io.output import FileSet

  writer = FileSet(out, overwrite)    # each NAME.json / NAME.png written atomically
  writer.check(commands)
  runs = []
  if 'curves' in commands:
    try:
      mar_steps = DEFAULT_MAR_STEPS if FLAGS.mar_steps is None else FLAGS.mar_steps
      runs = ([RunSpec.parse(t) for t in FLAGS.runs.split(',') if t] if FLAGS.runs else
              default_runs(s.num_iter, s.upper_steps, s.lower_steps,
                           common.parse_int_list(mar_steps, '--mar_steps')))
      for r in runs:
        r.step_plan()
    except RunSpecError as e:
      raise common.CliError(str(e)) from None
  given = FLAGS.metric if FLAGS['metric'].present else ''
  metric_name = given or ('digits' if config.tokenizer.kind == 'pixels' else 'inception')
  metric = None
  if 'curves' in commands:
    if metric_name == 'none':
      raise common.CliError('curves need a quality metric: --metric=digits or inception')
    metric = cli_flags.build_metric(metric_name, inception=FLAGS.inception,
                                   ref_stats=FLAGS.ref_stats,
                                   batch_size=FLAGS.inception_batch_size,
                                   precision_recall=FLAGS.precision_recall)

  model, source = runner.build_model(config, seed=s.seed)
  mesh = runner.make_mesh(config)
  sampler = runner.make_sampler(model, config, mesh)
  class_num = system_of(config).condition_count(config)
  key = jax.random.key(s.seed)
  info = {'config': config.get('name', ''), 'model': source, 'backend': jax.default_backend(),
          'devices': jax.device_count(), 'command': ' '.join(['disa-evidence', *sys.argv[1:]]),
          'preset': s.preset, 'strategy': s.strategy, 'num_iter': plan.num_iter,
          'steps_requested': list(plan.steps), 'max_timestep': plan.max_timestep, 'cfg': s.cfg,
          'cfg_schedule': s.cfg_schedule, 'temperature': s.temperature, 'seed': s.seed}
  ckpt = config.get('checkpoint', '')
  tag = (f'{config.get("name", "")}, '
         f'{os.path.basename(os.path.normpath(ckpt)) if ckpt else "random weights"}')
  results = {}

  def n_images(cmd):
    return FLAGS.num_images or _default_images(cmd, class_num)

  def log(msg):
    print(msg, flush=True)

  probes = [c for c in ('variance', 'straightness') if c in commands]
  for measure in probes:
    t0 = time.perf_counter()
    n = n_images(measure)
    samples = FLAGS.samples if measure == 'variance' else FLAGS.straightness_samples
    rows = evidence.probe_steps(
      sampler, _labels(n, config, class_num), key, plan=plan, sampling=s,
      batch_size=s.batch_size, measures=(measure,), samples=samples,
      probe_steps=FLAGS.probe_steps, probe_max_timestep=plan.max_timestep)[measure]
    res = {**info, 'measure': measure, 'num_images': n, 'samples_per_token': samples,
           'probe_steps': FLAGS.probe_steps, 'per_step': rows,
           'seconds': round(time.perf_counter() - t0, 2)}
    common.write_json(writer.path(measure, 'json'), res)
    if measure == 'variance':
      with writer.write('variance', 'png') as tmp:
        plots.per_step(rows, 'variance', ylabel='variance of the next token (mean over dims)',
                       title=f'Sampling variance per AR step ({tag})',
                       path=tmp,
                       note=f'{n} images, {samples} head samples per token, {FLAGS.probe_steps} '
                            'diffusion steps; error bars: standard error over tokens')
    else:
      with writer.write('straightness', 'png') as tmp:
        plots.per_step(rows, 'straightness', ylabel='mean cos(step, x0 - xT)',
                       title=f'Denoising path straightness per AR step ({tag})',
                       path=tmp,
                       note=f'{n} images, {samples} trajectories per token, {FLAGS.probe_steps} '
                            'diffusion steps; 1 = straight line')
    results[measure] = res
    log(f'{measure}: AR step 1 {rows[0][measure]:.4g} -> AR step {rows[-1]["ar_step"] + 1} '
        f'{rows[-1][measure]:.4g}; wrote {writer.path(measure, "json")}')

  if 'predictability' in commands:
    t0 = time.perf_counter()
    n = n_images('predictability')
    x, y, st, img = evidence.collect_pairs(sampler, _labels(n, config, class_num), key,
                                           plan=plan, sampling=s, batch_size=s.batch_size)
    try:
      pr = evidence.predictability(x, y, st, img, holdout=FLAGS.holdout, hidden=FLAGS.mlp_hidden,
                                   steps=FLAGS.mlp_steps, seed=s.seed)
    except ValueError as e:
      raise common.CliError(f'predictability: {e}') from None
    res = {**info, 'measure': 'predictability', 'num_images': n, **pr,
           'seconds': round(time.perf_counter() - t0, 2)}
    common.write_json(writer.path('predictability', 'json'), res)
    with writer.write('predictability', 'png') as tmp:
      plots.predictability(pr['per_step'], title=f'Predictability of the next token ({tag})',
                           path=tmp,
                           note=f'{n} images ({pr["test_images"]} held out), MLP '
                                f'{FLAGS.mlp_hidden}x2 trained {FLAGS.mlp_steps} steps on z -> x')
    results['predictability'] = res
    ps = pr['per_step']
    log(f'predictability: held-out MSE AR step 1 {ps[0]["mse"]:.4g} -> AR step '
        f'{ps[-1]["ar_step"] + 1} {ps[-1]["mse"]:.4g}; wrote '
        f'{writer.path("predictability", "json")}')

  if 'curves' in commands:
    t0 = time.perf_counter()
    n = n_images('curves')
    decoder = runner.build_decoder(config, model)
    if decoder is None:
      raise common.CliError('curves need images: pass --vae DIR (KL-16 models) or use a config '
                            'with a pixel tokenizer')
    labels = runner.class_labels(n, common.parse_int_list(s.classes, '--classes'), class_num,
                                 order='blocks')

    def report(rec):
      log(f'  {rec["label"]:>16}: {rec["generate_s_per_image"]:.4g} s/image, '
          f'{rec["head_evals_per_image"]} head evals/image, {metric.primary} '
          f'{rec["quality"]:.4g}')

    from disa_jax.eval.curves import speed_quality

    recs = speed_quality(sampler, decoder, labels, runs=runs, sampling=s, key=key,
                         batch_size=s.batch_size, metric=metric, progress=report)
    res = {**info, 'measure': 'speed_quality', 'metric': metric_name, 'primary': metric.primary,
           'higher_is_better': metric.higher_is_better, 'num_images': n, 'runs': recs,
           'seconds': round(time.perf_counter() - t0, 2)}
    common.write_json(writer.path('curves', 'json'), res)
    with writer.write('curves', 'png') as tmp:
      plots.speed_quality(recs, metric_name=f'{metric_name} {metric.primary}',
                          higher_is_better=metric.higher_is_better,
                          title=f'Speed vs quality ({tag}, {n} images)',
                          path=tmp,
                          note=f'time: generation only (compile excluded), batch {s.batch_size}, '
                               f'{jax.device_count()} {jax.default_backend()} device(s)')
    results['curves'] = res
    log(f'curves: {len(recs)} runs; wrote {writer.path("curves", "json")}')
  return results


def _run(argv):
  commands = [a for a in argv[1:]]
  if not commands:
    raise common.CliError(f'name what to measure: {", ".join(COMMANDS)} or all')
  if 'all' in commands:
    commands = list(COMMANDS)
  bad = [c for c in commands if c not in COMMANDS]
  if bad:
    raise common.CliError(f'unknown command {bad[0]!r}; choose from {", ".join(COMMANDS)}, all')
  config = common.config_value(_CONFIG)
  common.check_config(config)
  config = cli_flags.apply_model_and_sampling(config)
  common.setup_runtime(config)
  run_commands(config, commands, FLAGS.out or os.path.join('outputs', 'evidence'),
               overwrite=FLAGS.overwrite)


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
