"""disa-cache: encode ImageNet once with the KL-16 VAE into an ArrayRecord moments cache.

  disa-cache --source=tfds --manual-dir=/data/imagenet_tars --data-dir=/data/tfds \\
      --vae=ckpt/kl16 --out=/data/in1k_kl16
  disa-cache --source=folder --folder=/data/imagenet --splits=train --vae=ckpt/kl16 \\
      --out=/data/in1k_kl16            # /data/imagenet/train/<wnid>/*.JPEG

Every image is centre-cropped to 256 (ADM), encoded with its horizontal flip, and the
posterior moments are stored (LTH14/mar main_cache.py). Train on the result with
  disa-train --config=configs/mar_base.py --config.data.cache_dir=/data/in1k_kl16 ...
Multi-host: run the same command on every host; each encodes its own slice.
"""

from __future__ import annotations

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

cli_flags.define_out()          # --out (required here), --overwrite
cli_flags.define_model()        # --vae (required here)
cli_flags.define_batch()        # --batch_size (default 64 here)
flags.DEFINE_enum('source', None, ['tfds', 'folder'], 'Where the images come from (required).')
flags.DEFINE_string('splits', 'train', 'Comma-separated splits (tfds: train, validation; '
                    'folder: sub-directories).')
flags.DEFINE_string('data_dir', None, 'TFDS data_dir.')
flags.DEFINE_string('manual_dir', None, 'Directory with ILSVRC2012_img_{train,val}.tar (TFDS).')
flags.DEFINE_string('folder', None, 'ImageFolder root (folder source).')
flags.DEFINE_integer('records_per_shard', 10000, 'Records per ArrayRecord shard.')

FLAGS = flags.FLAGS
DEFAULT_BATCH_SIZE = 64


def _run(argv):
  import os

  from disa_jax import sharding
  from disa_jax.data import cache, imagenet
  from disa_jax.data.records import CacheError

  del argv
  for name in ('source', 'out', 'vae'):
    if not getattr(FLAGS, name):
      raise common.CliError(f'--{name} is required (see disa-cache --help)')
  if FLAGS.checkpoint:
    raise common.CliError('--checkpoint does not apply to disa-cache; pass --vae=DIR')
  batch_size = DEFAULT_BATCH_SIZE if FLAGS.batch_size is None else FLAGS.batch_size
  if FLAGS.records_per_shard < 1:
    raise common.CliError('--records_per_shard must be >= 1')
  splits = [s for s in FLAGS.splits.split(',') if s]
  if not splits:
    raise common.CliError('--splits is empty; e.g. --splits=train')
  if not os.path.isdir(os.path.expanduser(FLAGS.vae)):
    raise common.CliError(f'VAE directory {FLAGS.vae} does not exist; convert kl16.ckpt first '
                          'with `disa-convert vae`')
  sharding.maybe_initialize_distributed()
  try:
    if FLAGS.source == 'folder':
      if not FLAGS.folder:
        raise common.CliError('--source=folder needs --folder=ROOT (ROOT/<split>/<wnid>/*.JPEG)')
      sources = {s: imagenet.FolderSource(os.path.join(FLAGS.folder, s)) for s in splits}
    else:
      sources = {s: imagenet.tfds_source(s, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
                 for s in splits}
    encode_fn = imagenet.vae_encode_fn(imagenet.load_vae_encoder(FLAGS.vae))
    out = cache.cache_moments(
      FLAGS.out, sources, encode_fn, preprocess=imagenet.preprocess, batch_size=batch_size,
      records_per_shard=FLAGS.records_per_shard, overwrite=FLAGS.overwrite, progress=True,
      meta={'dataset': 'imagenet2012', 'tokenizer': 'kl16', 'latent_scale': imagenet.KL16_SCALE,
            'image_size': imagenet.IMAGE_SIZE, 'source': FLAGS.source})
  except (CacheError, ImportError) as e:
    raise common.CliError(str(e).strip().splitlines()[0]) from None
  print(f'wrote {out}')


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
