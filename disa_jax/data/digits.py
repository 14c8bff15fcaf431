"""The embedded dataset: scikit-learn's bundled handwritten digits (1797 images, 10 classes).

No download: the 8x8 images (values 0..16) ship inside scikit-learn. They are upsampled to
16x16 (bicubic, clipped to the original range) and scaled to [-1, 1]; with the identity
"pixels" tokenizer and 2x2 patches an image is 64 tokens of 4 values, like MAR's 64-token
K=64 layout. A fixed, class-stratified held-out split (30 images per class) is never trained
on and serves the quality metric (`disa_jax.eval.digits_quality`).

The digits go through the same pipeline as ImageNet: `PixelEncoder` stands in for the VAE
(mean = pixels, logvar = -30, i.e. a deterministic posterior), `cache_moments` writes
ArrayRecord shards, grain reads them.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from disa_jax.data import records

SIZE = 16
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 30
SPLIT_SEED = 0
TOKEN_SCALE = 1.4       # pixels in [-1, 1] have std ~0.70; tokens = pixels * 1.4 ~ unit std
PIXEL_LOGVAR = -30.0    # the clamp floor of DiagonalGaussianDistribution: std 3e-7

_log = logging.getLogger(__name__)


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
  from PIL import Image
  from sklearn.datasets import load_digits

  d = load_digits()
  imgs = []
  for im in d.images.astype(np.float32):
    up = np.asarray(Image.fromarray(im, mode='F').resize((SIZE, SIZE), Image.BICUBIC))
    imgs.append(np.clip(up, 0.0, 16.0) / 16.0 * 2.0 - 1.0)
  return np.stack(imgs)[..., None].astype(np.float32), d.target.astype(np.int32)


def stratified_split(labels: np.ndarray, per_class: int, *, seed: int,
                     num_classes: int) -> dict[str, np.ndarray]:
  """{'train': idx, 'heldout': idx}: `per_class` random indices of each class held out (fixed
  seed), the rest for training; both sorted."""
  rng = np.random.default_rng(seed)
  held = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    held.extend(rng.choice(idx, per_class, replace=False))
  held = np.sort(np.asarray(held))
  train = np.setdiff1d(np.arange(len(labels)), held)
  return {'train': train, 'heldout': held}


@functools.cache
def split_indices() -> dict[str, np.ndarray]:
  """{'train': idx, 'heldout': idx}: 30 random images per class held out (fixed seed)."""
  return stratified_split(_load()[1], HELDOUT_PER_CLASS, seed=SPLIT_SEED,
                          num_classes=NUM_CLASSES)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 16, 16, 1] in [-1, 1], labels int32 [N]) of 'train' or 'heldout'."""
  idx = split_indices()
  if split not in idx:
    raise ValueError(f'digits split must be one of {sorted(idx)}, got {split!r}')
  images, labels = _load()
  return images[idx[split]], labels[idx[split]]


def load_split_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 16, 16, 3], labels): the real images as a tokenizer would decode them."""
  from disa_jax.tokenizers.image import to_uint8

  x, y = load_split(split)
  return np.repeat(to_uint8(x), 3, axis=-1), y


class ArraySource:
  """Random-access examples {'image': float32 [H, W, C], 'label': int} from arrays."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': int(self.labels[i])}


def pixel_encode(images):
  """The identity tokenizer as an encoder: (mean = images, logvar = -30)."""
  x = np.asarray(images, np.float32)
  return x, np.full_like(x, PIXEL_LOGVAR)


def build_pixel_cache(cache_dir, load_split, *, dataset: str, latent_scale: float,
                      image_size: int, overwrite: bool = False) -> Path:
  """Writes a pixel-token moments cache of `load_split('train' | 'heldout')` into `cache_dir`
  (the bundled datasets: sklearn digits, MNIST)."""
  from disa_jax.data.cache import cache_moments

  sources = {s: ArraySource(*load_split(s)) for s in ('train', 'heldout')}
  return cache_moments(
    cache_dir, sources, pixel_encode, preprocess=lambda ex: (ex['image'], ex['label']),
    batch_size=256, meta={'dataset': dataset, 'tokenizer': 'pixels',
                          'latent_scale': latent_scale, 'image_size': image_size},
    overwrite=overwrite)


def ensure_pixel_cache(cache_dir, build, *, dataset: str, name: str) -> Path:
  """The `dataset` cache at `cache_dir`, built with `build(dir, overwrite=True)` first if it
  is missing or incomplete; another dataset's cache there is an error (`name` names ours)."""
  d = Path(cache_dir).expanduser()
  try:
    meta = records.read_meta(d)
    if meta.get('dataset') == dataset:
      return d
    raise records.CacheError(f'{d} holds a {meta.get("dataset")!r} cache, not {name}; '
                             'choose another --config.data.cache_dir')
  except records.CacheError as e:
    if (d / 'meta.json').exists():
      raise
    _log.info('building the %s cache in %s (%s)', name.removeprefix('the '), d, e)
  return build(d, overwrite=True)


def build_cache(cache_dir, *, overwrite: bool = False) -> Path:
  """Writes the digits moments cache (train + heldout splits) into `cache_dir`."""
  return build_pixel_cache(cache_dir, load_split, dataset='sklearn_digits',
                           latent_scale=TOKEN_SCALE, image_size=SIZE, overwrite=overwrite)


def ensure_cache(cache_dir) -> Path:
  """The digits cache at `cache_dir`, built first if it is missing or incomplete."""
  return ensure_pixel_cache(cache_dir, build_cache, dataset='sklearn_digits', name='the digits')
