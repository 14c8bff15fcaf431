"""disa-sample: generate images with MAR + DiSA (or the original MAR schedule).

  disa-sample --num-images=20 --out=outputs/digits     # the bundled digits model
  disa-sample --config=configs/mar_base.py:cpu --num-images=8 --out=outputs/demo
  disa-sample --config=configs/mar_base.py --checkpoint=ckpt/mar_base --vae=ckpt/kl16 \\
      --classes=207,360,387 --num-images=12 --preset=disa --out=outputs/mar_b_disa

Writes into --out (atomically): images/NNNNNN.png (NNNNNN = global image id), tokens.npy
(when there is no decoder, or with --save_tokens), labels.npy, grid.png and metrics.json (wall
time, compile time, images/s, steps per AR step, compilations, padding waste). Runs as one
process of a multi-host job too (launch/tpu.py, launch/gpu.py): the same images, each written
once, whatever the number of processes and devices.
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from disa_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/mar_base.py or configs/mar_base.py:cpu '
  '(default: the bundled digits model, configs/digits.py).',
  lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Model directory (disa-convert / disa-train output). '
                    'Default: config.checkpoint; none = random weights.')
flags.DEFINE_string('vae', None, 'KL-16 VAE directory (disa-convert vae output).')
flags.DEFINE_string('out', None, 'Output directory (must not exist unless --overwrite).')
flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
flags.DEFINE_integer('num_images', None, 'Number of images (config.sampling.num_images).')
flags.DEFINE_integer('batch_size', None, 'Global batch size (config.sampling.batch_size).')
flags.DEFINE_string('classes', None, 'Comma-separated class ids, cycled over the images.')
flags.DEFINE_integer('seed', None, 'Random seed; image i uses fold_in(key(seed), i).')
flags.DEFINE_enum('preset', None, ['mar', 'disa'], 'Step schedule preset.')
flags.DEFINE_string('strategy', None, 'DiSA strategy: constant, linear, cosine, two-stage.')
flags.DEFINE_integer('upper_steps', None, 'Diffusion steps at the first AR step (T_hi).')
flags.DEFINE_integer('lower_steps', None, 'Diffusion steps at the last AR step (T_lo).')
flags.DEFINE_string('steps', None, 'Explicit steps per AR step, "50,49,...".')
flags.DEFINE_integer('num_iter', None, 'AR steps K.')
flags.DEFINE_float('cfg', None, 'Classifier-free guidance scale (1.0 = off).')
flags.DEFINE_string('cfg_schedule', None, 'linear or constant.')
flags.DEFINE_float('temperature', None, 'Diffusion-noise temperature.')
flags.DEFINE_integer('max_timestep', None, 'Timestep clamp (DiSA: 950); -1 disables.')
flags.DEFINE_bool('save_images', True, 'Write one PNG per image (else only the grid).')
flags.DEFINE_bool('save_tokens', False, 'Also write tokens.npy when there is an image decoder '
                  '(always written without one).')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')

FLAGS = flags.FLAGS

SAMPLING_FLAGS = ('num_images', 'batch_size', 'classes', 'seed', 'preset', 'strategy',
                  'upper_steps', 'lower_steps', 'steps', 'num_iter', 'cfg', 'cfg_schedule',
                  'temperature', 'max_timestep')


def apply_flags(config):
  """Command-line flags override `config.sampling`, `config.checkpoint`, `config.tokenizer`."""
  with config.unlocked():
    for name in SAMPLING_FLAGS:
      value = getattr(FLAGS, name)
      if value is not None:
        config.sampling[name] = value
    if FLAGS.checkpoint is not None:
      config.checkpoint = FLAGS.checkpoint
    if FLAGS.vae is not None:
      config.tokenizer.vae = FLAGS.vae
      if config.tokenizer.kind == 'none':    # CPU/tiny configs: --vae asks for images
        config.tokenizer.kind = 'kl16'
  return config


def validate(config):
  from disa_jax.validation import validate_config

  validate_config(config)
  s = config.sampling
  if s.num_images < 1:
    raise common.CliError(f'--num_images must be >= 1, got {s.num_images}')
  if s.batch_size < 1:
    raise common.CliError(f'--batch_size must be >= 1, got {s.batch_size}')
  if s.cfg_schedule not in ('linear', 'constant'):
    raise common.CliError(f'--cfg_schedule must be linear or constant, got {s.cfg_schedule!r}')
  if s.temperature <= 0:
    raise common.CliError(f'--temperature must be > 0, got {s.temperature}')
  from disa_jax.models.mar import MARConfig

  seq = MARConfig.from_dict(dict(config.model)).seq_len
  if not 1 <= s.num_iter <= seq:
    raise common.CliError(f'--num_iter must be in [1, {seq}] for this model ({seq} tokens), '
                          f'got {s.num_iter}')
  if config.checkpoint and not os.path.exists(os.path.expanduser(config.checkpoint)):
    raise common.CliError(f'checkpoint {config.checkpoint} does not exist')
  vae = config.tokenizer.get('vae', '')
  if vae and not os.path.exists(os.path.expanduser(vae)):
    raise common.CliError(f'VAE directory {vae} does not exist')


def sample(config, out: str, *, overwrite=False, save_images=True, save_tokens=False,
           show_progress=True) -> dict:
  """Runs a full sampling job described by `config`; returns the metrics written.

  Multi-process: every process samples its rows of each global batch and writes the PNGs of
  its images (named by global image id); tokens are gathered to process 0, which writes
  tokens.npy, labels.npy, grid.png and metrics.json (see `common.OutputDir`).
  """
  import jax
  import numpy as np
  from PIL import Image

  from disa_jax import runner
  from disa_jax import tokenizer as tok

  validate(config)
  plan = runner.step_plan(config.sampling)                   # schedule errors before loading
  model_cfg_dict = dict(config.model)
  from disa_jax.models.mar import MARConfig

  class_num = MARConfig.from_dict(model_cfg_dict).class_num
  labels = runner.class_labels(config.sampling.num_images,
                               common.parse_int_list(config.sampling.classes, '--classes'),
                               class_num)
  with common.OutputDir(out, overwrite=overwrite) as od:
    setup = runner.setup_sampling(config, seed=config.sampling.seed)
    model, source, decoder, mesh, sampler = (setup.model, setup.source, setup.decoder,
                                             setup.mesh, setup.sampler)
    load_s = setup.load_s
    is_main = jax.process_index() == 0
    if is_main:
      print(f'model: {config.get("name", "?")} ({source})')
      if decoder is None:
        print('no image decoder for this config (pass --vae DIR for KL-16 models): '
              'writing tokens and a latent preview')
    splan = sampler.plan(config.sampling.batch_size, steps=plan.steps,
                         max_timestep=plan.max_timestep, cfg=config.sampling.cfg,
                         cfg_schedule=config.sampling.cfg_schedule)
    if is_main:
      print(f'compiling {len(splan.backbone_buckets)} backbone + {len(splan.head_buckets)} head '
            'buckets (cached on disk for later runs) ...', flush=True)
    precompile_s = sampler.compile(splan)
    bar = None
    n_batches = -(-len(labels) // config.sampling.batch_size)
    if show_progress and is_main:
      from tqdm import tqdm

      bar = tqdm(total=n_batches * plan.num_iter, desc='AR steps', unit='step', leave=False)
    totals = runner.RunTotals(compile_s=precompile_s)
    key = jax.random.key(config.sampling.seed)
    img_dir = os.path.join(od.path, 'images')
    if save_images and decoder is not None:
      os.makedirs(img_dir, exist_ok=True)
    keep_tokens = decoder is None or save_tokens
    all_tokens, grid_imgs, decode_s = [], [], 0.0
    for batch in runner.sample_batches(
        sampler, labels, batch_size=config.sampling.batch_size, plan=plan,
        sampling=config.sampling, key=key, totals=totals, gather=keep_tokens,
        on_step=(lambda _: bar.update(1)) if bar else None):
      t0 = time.perf_counter()
      if keep_tokens and is_main:
        all_tokens.append(batch.all_tokens)
      if decoder is not None:
        images = decoder.decode(batch.tokens)
      elif is_main:
        images = tok.token_preview(model.config,
                                   batch.all_tokens[: max(0, 64 - len(grid_imgs))])
      else:
        images = []
      decode_s += time.perf_counter() - t0
      if save_images and decoder is not None:
        for i, img in zip(batch.ids, images, strict=True):
          Image.fromarray(img).save(os.path.join(img_dir, f'{i:06d}.png'))
      grid_imgs.extend(images[: max(0, 64 - len(grid_imgs))])
    if bar:
      bar.close()
    metrics = _metrics(config, plan, sampler, totals, load_s, decode_s, source, mesh)
    if is_main:
      np.save(os.path.join(od.path, 'labels.npy'), labels)
      if all_tokens:
        np.save(os.path.join(od.path, 'tokens.npy'), np.concatenate(all_tokens))
      Image.fromarray(tok.make_grid(np.stack(grid_imgs))).save(os.path.join(od.path, 'grid.png'))
      common.write_json(os.path.join(od.path, 'metrics.json'), metrics)
  if jax.process_index() == 0:
    print(f'{totals.images} images in {totals.sample_s:.2f} s sampling '
          f'({metrics["images_per_s"]:.3f} images/s) + {totals.compile_s:.2f} s compile; '
          f'wrote {od.final}')
  return metrics


def _metrics(config, plan, sampler, totals, load_s, decode_s, source, mesh):
  import jax

  from disa_jax import sharding as shd

  last = totals.stats[-1]
  report = last.plan.report()
  head_compiles = sum(v for k, v in sampler.compile_log.items() if k[0].startswith('head'))
  return {
    'config': config.get('name', ''),
    'model': source,
    'num_images': totals.images,
    'batch_size': config.sampling.batch_size,
    'devices': jax.device_count(),
    'data_parallel': shd.data_size(mesh),
    'processes': jax.process_count(),
    'backend': jax.default_backend(),
    'preset': config.sampling.preset,
    'strategy': config.sampling.strategy,
    'num_iter': plan.num_iter,
    'cfg': config.sampling.cfg,
    'cfg_schedule': config.sampling.cfg_schedule,
    'temperature': config.sampling.temperature,
    'max_timestep': plan.max_timestep,
    'wall_s': round(load_s + totals.compile_s + totals.sample_s + decode_s, 4),
    'load_s': round(load_s, 4),
    'compile_s': round(totals.compile_s, 4),
    'sample_s': round(totals.sample_s, 4),
    'decode_s': round(decode_s, 4),
    'images_per_s': totals.images / totals.sample_s if totals.sample_s > 0 else None,
    'compilations': {
      'total': len(sampler.compile_log),
      'backbone': sum(1 for k in sampler.compile_log if k[0] == 'backbone'),
      'head': sum(1 for k in sampler.compile_log if k[0].startswith('head')),
      'head_compile_s': round(head_compiles, 4),
    },
    **{k: report[k] for k in ('steps_requested', 'steps_actual', 'tokens_per_step',
                              'head_token_steps_per_image', 'head_token_steps_per_image_padded',
                              'head_padding_waste', 'encoder_padding_waste')},
  }


def _run(argv):
  del argv
  config = _CONFIG.value
  if config is None:  # the bundled digits model (works from an installed package)
    from disa_jax.config import digits_config

    config = digits_config()
  config = apply_flags(config)
  common.setup_runtime(config)
  out = FLAGS.out or os.path.join('outputs', f'sample-{config.get("name", "run")}')
  sample(config, out, overwrite=FLAGS.overwrite, save_images=FLAGS.save_images,
         save_tokens=FLAGS.save_tokens, show_progress=FLAGS.progress)


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
