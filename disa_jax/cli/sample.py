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

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config(
  'Config file, e.g. configs/mar/base.py or configs/mar/base.py:cpu (default: the bundled '
  'digits model, configs/mar/digits.py).')
cli_flags.define_model()
cli_flags.define_output()
cli_flags.define_sampling()
cli_flags.define_system_flags()

FLAGS = flags.FLAGS

SAMPLING_FLAGS = cli_flags.SAMPLING_FLAGS
apply_flags = cli_flags.apply_model_and_sampling
validate = cli_flags.validate_sampling


def sample(config, out: str, *, overwrite=False, save_images=True, save_tokens=False,
           show_progress=True) -> dict:
  """Runs a full sampling job described by `config`; returns the metrics written.

  Multi-process: every process samples its rows of each global batch and writes the PNGs of
  its images (named by global image id); tokens are gathered to process 0, which writes
  tokens.npy, labels.npy, grid.png and metrics.json (see `disa_jax.io.output.OutputDir`).
  """
  import jax
  import numpy as np
  from PIL import Image

  from disa_jax.engine import runner
  from disa_jax.io.output import OutputDir, write_json
  from disa_jax.systems.base import system_of
  from disa_jax.tokenizers import image as tok

  system = system_of(config)
  validate(config)
  plan = system.stage_plan(config.sampling)                  # schedule errors before loading
  labels = system.conditions(config, config.sampling.num_images)
  with OutputDir(out, overwrite=overwrite, inputs=cli_flags.input_paths(config)) as od:
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
        images = system.token_preview(model, batch.all_tokens[: max(0, 64 - len(grid_imgs))])
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
      write_json(os.path.join(od.path, 'metrics.json'), metrics)
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
  config = common.config_value(_CONFIG)
  if config is None:  # the bundled digits model (works from an installed package)
    from disa_jax.systems.mar.variants import digits_config

    config = digits_config()
  own = cli_flags.system_command(config, 'sample')
  if own is not None:          # a system with its own command body (D-AR)
    common.setup_runtime(config)
    own(config)
    return
  config = apply_flags(config)
  common.setup_runtime(config)
  out = FLAGS.out or os.path.join('outputs', f'sample-{config.get("name", "run")}')
  sample(config, out, overwrite=FLAGS.overwrite, save_images=FLAGS.save_images,
         save_tokens=FLAGS.save_tokens, show_progress=FLAGS.progress)


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
