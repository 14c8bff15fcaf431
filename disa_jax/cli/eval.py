"""disa-eval: generate the evaluation set (50 images per class) and measure its quality.

  # FID-50K of MAR-B with DiSA (ImageNet 256; weights converted once with disa-convert)
  disa-eval --config=configs/mar_base.py --checkpoint=ckpt/mar_base --vae=ckpt/kl16 \\
      --metric=inception --inception=ckpt/inception --ref-stats=VIRTUAL_imagenet256_labeled.npz \\
      --num-images=50000 --batch-size=256 --out=outputs/eval_mar_base_disa
  # the original MAR schedule for comparison
  disa-eval ... --preset=mar --num-iter=256 --upper-steps=100 --out=outputs/eval_mar_base_mar
  # the bundled digits model with its embedded classifier score
  disa-eval --config=configs/digits.py --metric=digits --out=outputs/eval_digits

Labels follow the official order (class i repeated num_images / class_num times in a row);
image i's randomness depends only on (seed, i). Work happens in `<out>.partial/`: one shard
per batch and process (and `images/NNNNNN.png` with --save-images), so a preempted run
continues where it stopped when the same command is run again, producing exactly the images an
uninterrupted run would (`--max-batches` bounds the work of one invocation). When every batch
is done the metrics are computed, `metrics.json` is written (metrics, timing: generation only,
decode, Inception features, metric, compile) and `<out>.partial` becomes `<out>`.
Metrics: `inception` (FID, IS, and sFID / precision / recall when the reference provides what
they need), `digits` (the bundled model's classifier score), `none` (timing only), or
`module:Class` for a custom metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from absl import flags

from disa_jax import integrity
from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config()
cli_flags.define_model()
cli_flags.define_output()
cli_flags.define_system_flags()
cli_flags.define_sampling()

cli_flags.define_metric()
flags.DEFINE_integer('max_batches', 0, 'Stop after this many new batches (0: all); run the '
                     'same command again to continue.')
FLAGS = flags.FLAGS

FORMAT = 'disa_jax.eval'


def eval_labels(num_images: int, classes: list[int], class_num: int):
  """The official evaluation order (class i repeated num_images / class_num times in a row),
  or `classes` cycled when given."""
  from disa_jax.engine import runner

  return runner.class_labels(num_images, classes, class_num, order='blocks')


build_metric = cli_flags.build_metric


# Sampling fields the fingerprint covers through other entries (the resolved step plan, the
# labels, or a top-level entry); every other field of `config.sampling` (FlowAR's guidance,
# MAR's solver / eta, Harmon's prompts, ...) is fingerprinted under `sampling_other`.
_COVERED_SAMPLING = frozenset({
  'cfg', 'cfg_schedule', 'temperature', 'seed', 'num_images', 'batch_size', 'classes',
  'preset', 'strategy', 'upper_steps', 'lower_steps', 'steps', 'num_iter', 'max_timestep',
  'baseline_steps'})


def fingerprint(config, plan, labels, *, metric: str, inception, ref_stats,
                save_images: bool) -> dict:
  """What must not change between an interrupted run and its continuation."""
  s = config.sampling
  other = {k: s[k] for k in sorted(s.keys()) if k not in _COVERED_SAMPLING}
  for k, path in list(other.items()):      # e.g. Harmon's prompts_file: its content counts
    if k.endswith('_file') and path and os.path.isfile(os.path.expanduser(path)):
      other[k + '_sha256'] = integrity.file_sha256(os.path.expanduser(path))
  return {
    'format': FORMAT, 'version': 2,
    'sampling_other': json.loads(json.dumps(other, default=str)),
    'model': dict(config.model), 'checkpoint': config.get('checkpoint', ''),
    'tokenizer': dict(config.tokenizer),
    'steps': list(plan.steps), 'max_timestep': plan.max_timestep, 'cfg': s.cfg,
    'cfg_schedule': s.cfg_schedule, 'temperature': s.temperature, 'seed': s.seed,
    'num_images': len(labels), 'batch_size': s.batch_size,
    'labels_sha1': hashlib.sha1(labels.tobytes()).hexdigest(),
    'metric': metric, 'inception': inception or '', 'ref_stats': ref_stats or '',
    'save_images': bool(save_images),
    'matmul_precision': config.runtime.get('matmul_precision', ''),
    # the files behind the paths: a model directory replaced at the same path is another run
    **integrity.model_fingerprints(checkpoint=config.get('checkpoint', ''),
                                   vae=config.tokenizer.get('vae', ''), inception=inception),
  }


def evaluate(config, out: str, *, metric_name: str = 'inception', inception: str | None = None,
             ref_stats: str | None = None, inception_batch_size: int = 0,
             precision_recall: bool = True, overwrite=False, save_images=False, max_batches=0,
             show_progress=True) -> dict | None:
  """Runs (or continues) an evaluation; returns the metrics.json content, or None when it
  stopped early (`max_batches`)."""
  from disa_jax.engine import runner
  from disa_jax.eval import pipeline
  from disa_jax.io.output import ResumableDir
  from disa_jax.systems.base import system_of

  t_start = time.perf_counter()
  system = system_of(config)
  cli_flags.validate_sampling(config)
  plan = system.stage_plan(config.sampling)
  labels = system.conditions(config, config.sampling.num_images, order='blocks')
  if config.tokenizer.kind == 'none' or (config.tokenizer.kind == 'kl16'
                                         and not config.tokenizer.get('vae')):
    raise common.CliError('disa-eval needs images: pass --vae DIR (KL-16 models, converted with '
                          '`disa-convert vae`) or use a config with a pixel tokenizer')
  with ResumableDir(out, overwrite=overwrite,
                    inputs=[*cli_flags.input_paths(config), inception, ref_stats]) as rd:
    return _evaluate(config, rd, plan, labels, t_start, metric_name=metric_name,
                     inception=inception, ref_stats=ref_stats,
                     inception_batch_size=inception_batch_size,
                     precision_recall=precision_recall, save_images=save_images,
                     max_batches=max_batches, show_progress=show_progress, runner=runner,
                     pipeline=pipeline)


def _evaluate(config, rd, plan, labels, t_start, *, metric_name, inception, ref_stats,
              inception_batch_size, precision_recall, save_images, max_batches, show_progress,
              runner, pipeline):
  import jax

  final, partial = rd.final, rd.path

  metric = build_metric(metric_name, inception=inception, ref_stats=ref_stats,
                        batch_size=inception_batch_size, precision_recall=precision_recall,
                        cache=os.path.join(partial, 'ref_features.npz'))
  fp = fingerprint(config, plan, labels, metric=metric_name, inception=inception,
                   ref_stats=ref_stats, save_images=save_images)
  resumed = rd.prepare(fp)
  is_main = jax.process_index() == 0

  setup = runner.setup_sampling(config, seed=config.sampling.seed)
  source, decoder, sampler, load_s = setup.source, setup.decoder, setup.sampler, setup.load_s
  if is_main:
    print(f'model: {config.get("name", "?")} ({source}); {len(labels)} images, '
          f'{"continuing " + partial if resumed else "writing " + partial}')
  image_dir = None
  if save_images:
    image_dir = os.path.join(partial, 'images')
    os.makedirs(image_dir, exist_ok=True)
  bar = None
  if show_progress and is_main:
    from tqdm import tqdm

    bar = tqdm(total=len(labels), desc='images', unit='img', leave=False)

  def progress(done):
    bar.update(done - bar.n)

  outcome = pipeline.run(
    sampler, decoder, labels, plan=plan, sampling=config.sampling,
    key=jax.random.key(config.sampling.seed), batch_size=config.sampling.batch_size,
    metric=metric, store=pipeline.ShardStore(partial), image_dir=image_dir,
    max_batches=max_batches, progress=progress if bar else None)
  if bar:
    bar.close()
  if not outcome.complete:
    if is_main:
      print(f'stopped after {outcome.batches_run} batches (--max_batches); run the same command '
            f'again to continue {partial}')
    return None

  timing = {**{k: _round(v) for k, v in outcome.timing.items()}, 'load_s': round(load_s, 4),
            'total_s_this_run': round(time.perf_counter() - t_start, 4)}
  report = plan_report(sampler, config, plan)
  result = {
    'metric': metric_name,
    'primary': getattr(metric, 'primary', None),
    'higher_is_better': getattr(metric, 'higher_is_better', None),
    'metrics': outcome.metrics,
    'timing': timing,
    'num_images': outcome.num_images,
    'batches_run': outcome.batches_run,
    'batches_reused': outcome.batches_reused,
    'config': config.get('name', ''),
    'model': source,
    'devices': jax.device_count(),
    'processes': jax.process_count(),
    'backend': jax.default_backend(),
    'preset': config.sampling.preset,
    'strategy': config.sampling.strategy,
    'cfg': config.sampling.cfg,
    'cfg_schedule': config.sampling.cfg_schedule,
    'temperature': config.sampling.temperature,
    'seed': config.sampling.seed,
    'batch_size': config.sampling.batch_size,
    **report,
  }
  if is_main:
    common.write_json(os.path.join(partial, 'metrics.json'), result)
  rd.finish()
  if is_main:
    print(summary_line(result, final))
  return result


def plan_report(sampler, config, plan) -> dict:
  p = sampler.plan(config.sampling.batch_size, steps=plan.steps, max_timestep=plan.max_timestep,
                   cfg=config.sampling.cfg, cfg_schedule=config.sampling.cfg_schedule)
  rep = p.report()
  return {'num_iter': p.num_iter, 'max_timestep': plan.max_timestep,
          **{k: rep[k] for k in ('steps_requested', 'steps_actual', 'tokens_per_step',
                                 'head_token_steps_per_image', 'head_padding_waste')}}


def summary_line(result: dict, where: str) -> str:
  m, t = result['metrics'] or {}, result['timing']
  parts = [f'{k} {m[k]:.4g}' for k in ('fid', 'inception_score', 'sfid', 'precision', 'recall')
           if k in m]
  if result['metric'] not in ('inception', 'none') and m:
    parts = [f'{k} {v:.4g}' for k, v in m.items() if isinstance(v, float)][:6]
  gen = t.get('generate_s_per_image')
  return (f'{result["num_images"]} images: {", ".join(parts) or "no metric"}; generation '
          f'{gen:.4g} s/image ({t.get("generate_s", 0):.2f} s), decode {t.get("decode_s", 0):.2f}'
          f' s, features {t.get("features_s", 0):.2f} s; wrote {where}')


def _round(v):
  return round(v, 6) if isinstance(v, float) else v


def eval_command(config):
  """The shared disa-eval body (MAR, FlowAR, xAR, Harmon): flags onto the config, then
  `evaluate` (resumable)."""
  common.check_config(config)
  config = cli_flags.apply_model_and_sampling(config)
  from disa_jax.systems.base import system_of

  with config.unlocked():
    if FLAGS.num_images is None:   # 50 images per condition (class)
      config.sampling.num_images = 50 * system_of(config).condition_count(config)
    if FLAGS.metric == 'inception' and not (FLAGS.inception and FLAGS.ref_stats):
      raise common.CliError('--metric=inception needs --inception DIR and --ref_stats FILE (or '
                            'pass --metric=none for timing only)')
  out = FLAGS.out or os.path.join('outputs', f'eval-{config.get("name", "run")}')
  return evaluate(config, out, metric_name=FLAGS.metric, inception=FLAGS.inception,
                  ref_stats=FLAGS.ref_stats, inception_batch_size=FLAGS.inception_batch_size,
                  precision_recall=FLAGS.precision_recall, overwrite=FLAGS.overwrite,
                  save_images=FLAGS.save_images and FLAGS['save_images'].present,
                  max_batches=FLAGS.max_batches, show_progress=FLAGS.progress)


def _run(argv):
  del argv
  cli_flags.run_command(common.config_value(_CONFIG), 'eval', eval_command, name='disa-eval')


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
