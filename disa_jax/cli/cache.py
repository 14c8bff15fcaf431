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

import argparse
import sys

from disa_jax.cli import common


def parse_args(argv):
  p = argparse.ArgumentParser(prog='disa-cache', description=__doc__.split('\n\n')[0])
  p.add_argument('--source', choices=['tfds', 'folder'], required=True)
  p.add_argument('--out', required=True, help='cache directory to write')
  p.add_argument('--vae', required=True, help='KL-16 VAE model directory (disa-convert vae)')
  p.add_argument('--splits', default='train', help='comma-separated splits (tfds: train, '
                 'validation; folder: sub-directories)')
  p.add_argument('--data-dir', '--data_dir', default=None, help='TFDS data_dir')
  p.add_argument('--manual-dir', '--manual_dir', default=None,
                 help='directory with ILSVRC2012_img_{train,val}.tar (TFDS)')
  p.add_argument('--folder', default=None, help='ImageFolder root (folder source)')
  p.add_argument('--batch-size', '--batch_size', type=int, default=64)
  p.add_argument('--records-per-shard', '--records_per_shard', type=int, default=10000)
  p.add_argument('--overwrite', action='store_true')
  return p.parse_args(argv)


def main(args) -> None:
  import os

  from disa_jax import sharding
  from disa_jax.data import cache, imagenet

  sharding.maybe_initialize_distributed()
  splits = [s for s in args.splits.split(',') if s]
  if args.source == 'folder':
    if not args.folder:
      raise common.CliError('--source=folder needs --folder=ROOT (ROOT/<split>/<wnid>/*.JPEG)')
    sources = {s: imagenet.FolderSource(os.path.join(args.folder, s)) for s in splits}
  else:
    sources = {s: imagenet.tfds_source(s, data_dir=args.data_dir, manual_dir=args.manual_dir)
               for s in splits}
  if not os.path.exists(args.vae):
    raise common.CliError(f'VAE directory {args.vae} does not exist; convert kl16.ckpt first '
                          'with `disa-convert vae`')
  encode_fn = imagenet.vae_encode_fn(imagenet.load_vae_encoder(args.vae))
  out = cache.cache_moments(
    args.out, sources, encode_fn, preprocess=imagenet.preprocess, batch_size=args.batch_size,
    records_per_shard=args.records_per_shard, overwrite=args.overwrite, progress=True,
    meta={'dataset': 'imagenet2012', 'tokenizer': 'kl16', 'latent_scale': imagenet.KL16_SCALE,
          'image_size': imagenet.IMAGE_SIZE, 'source': args.source})
  print(f'wrote {out}')


def run(argv=None):
  from disa_jax.data.records import CacheError

  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    main(args)
  except (*common.USER_ERRORS, CacheError, ImportError) as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
