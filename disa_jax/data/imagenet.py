"""ImageNet for MAR training: ADM centre crop, image sources, and the KL-16 encoder.

- `center_crop_arr` is ADM's `center_crop_arr` (LTH14/mar `util/crop.py`): halve with a BOX
  filter while the short side is >= 2 * size, BICUBIC-resize so the short side is `size`
  (long side rounded), then crop the centre.
- Sources are random-access sequences of {'image': uint8 [H, W, 3], 'label': int}:
  `tfds_source` (TFDS `imagenet2012`, prepared from the manually downloaded tars) or
  `folder_source` (an ImageFolder tree `root/<wnid>/*.JPEG`, labels = sorted wnids, the
  torchvision order the official code uses; TFDS's label order is the same sorted list).
- `vae_encode_fn` wraps `disa_jax.tokenizers.kl16.AutoencoderKL.encode` (jitted) as the
  `encode_fn` of `disa_jax.data.cache.cache_moments`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SIZE = 256
KL16_SCALE = 0.2325


def center_crop_arr(pil_image, image_size: int = IMAGE_SIZE) -> np.ndarray:
  """ADM centre crop of a PIL image -> uint8 [image_size, image_size, 3]."""
  from PIL import Image

  img = pil_image
  while min(*img.size) >= 2 * image_size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = image_size / min(*img.size)
  img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
  arr = np.array(img)
  y0 = (arr.shape[0] - image_size) // 2
  x0 = (arr.shape[1] - image_size) // 2
  return arr[y0:y0 + image_size, x0:x0 + image_size]


def preprocess(example, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
  """{'image': uint8 HWC (or a PIL image / encoded bytes), 'label'} -> (float32 [-1, 1], label)."""
  import io

  from PIL import Image

  img = example['image']
  if isinstance(img, bytes | bytearray):
    img = Image.open(io.BytesIO(img))
  elif isinstance(img, np.ndarray):
    img = Image.fromarray(img)
  img = img.convert('RGB')
  arr = center_crop_arr(img, image_size).astype(np.float32)
  return arr / 127.5 - 1.0, int(example['label'])


class FolderSource:
  """ImageFolder-style tree: root/<class>/<image>; classes sorted by name."""

  EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.webp')

  def __init__(self, root):
    root = Path(root).expanduser()
    if not root.is_dir():
      raise FileNotFoundError(f'image folder {root} does not exist')
    self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not self.classes:
      raise FileNotFoundError(f'{root} has no class sub-directories (expected root/<wnid>/*.JPEG)')
    self.items = []
    for label, name in enumerate(self.classes):
      for f in sorted(os.listdir(root / name)):
        if f.lower().endswith(self.EXTENSIONS):
          self.items.append((root / name / f, label))

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    from PIL import Image

    path, label = self.items[i]
    with Image.open(path) as im:
      return {'image': np.asarray(im.convert('RGB')), 'label': label}


def tfds_source(split: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                name: str = 'imagenet2012'):
  """TFDS `imagenet2012` split as a random-access source (prepared on first use).

  Preparing needs the manually downloaded `ILSVRC2012_img_{train,val}.tar` in `manual_dir`
  and TensorFlow (`pip install tensorflow-datasets tensorflow-cpu`); reading the prepared
  ArrayRecord files does not.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError('the TFDS ImageNet source needs tensorflow-datasets (pip install '
                      '"tensorflow-datasets==4.9.10" tensorflow-cpu), or use --source=folder') \
      from None
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  if manual_dir is not None or not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.as_data_source(split=split)


def vae_encode_fn(vae, batch_sharding=None):
  """encode_fn(images float32 [B, 256, 256, 3] in [-1, 1]) -> (mean, logvar) numpy, jitted."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(vae)

  @jax.jit
  def enc(st, x):
    return nnx.merge(graphdef, st).encode(x)

  def fn(images):
    x = np.asarray(images, np.float32)
    if batch_sharding is not None:
      x = jax.device_put(x, batch_sharding)
    mean, logvar = enc(state, x)
    return np.asarray(mean), np.asarray(logvar)

  return fn


def load_vae_encoder(directory):
  """The KL-16 VAE (`disa_jax.tokenizers.kl16`, `disa_jax.checkpoint.load_vae`) from a model dir."""
  try:
    from disa_jax.checkpoint import load_vae
  except ImportError:
    load_vae = None
  if load_vae is None:
    raise ImportError('the KL-16 VAE (disa_jax.tokenizers.kl16 / disa_jax.checkpoint.load_vae) is not '
                      'available in this version of disa_jax; update disa_jax or cache with '
                      'another encoder')
  return load_vae(directory)
