"""The FID Inception-v3 in flax.nnx: the network behind FID, sFID, IS and precision/recall.

Same topology and numbers as the PyTorch FID port of the TF 2015-12-05 Inception graph
(`pytorch_fid/inception.py` FIDInceptionA/C/E_1/E_2, and `torch_fidelity/
feature_extractor_inceptionv3.py` of LTH14/torch-fidelity, which MAR's evaluation uses):

  uint8 images [N, H, W, 3] -> float32 -> TF1 bilinear resize to 299 x 299 (align_corners=False,
  `interpolate_bilinear_2d_like_tensorflow1x`) -> (x - 128) / 128 -> stem -> Mixed_5b .. 7c
  -> global average pool -> 'pool' [N, 2048] (FID, precision/recall)
  -> x @ fc.kernel (no bias) -> 'logits_unbiased' [N, 1008] (Inception Score)
  'spatial' [N, 2023]: the Mixed_6d.branch1x1 activation (TF `mixed_6/conv`, 17 x 17 x 192),
  first 7 channels flattened in (h, w, c) order, as the ADM evaluator's sFID features.

Blocks: BasicConv2d = conv (no bias) + BatchNorm (inference, eps 1e-3) + ReLU; the average
pools inside Mixed blocks exclude the padding (TF semantics); Mixed_7c pools with max (a quirk
of the TF graph). Attribute names mirror the PyTorch state dict (`Mixed_6d.branch1x1.conv`,
`.bn.running_mean`, `fc`), so `disa-convert inception` maps `pt_inception-2015-12-05-6726825d.pth`
key for key. The BatchNorm running statistics are stored as (never trained) `nnx.Param`s.
Activations are NHWC; convolutions use 'highest' precision by default (fp32 on accelerators).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
FEATURES = ('pool', 'logits_unbiased', 'spatial')


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nnx.Module):
  """Inference BatchNorm over the last axis: (x - running_mean) / sqrt(running_var + eps) *
  scale + bias (PyTorch `BatchNorm2d.eval()`; `weight` is called `scale` here)."""

  def __init__(self, features: int, eps: float = 1e-3):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.running_mean = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.running_var = nnx.Param(jnp.ones((features,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    inv = jax.lax.rsqrt(self.running_var[...] + self.eps)
    return (x - self.running_mean[...]) * inv * self.scale[...] + self.bias[...]


class BasicConv2d(nnx.Module):
  def __init__(self, cin: int, cout: int, kernel, *, stride=1, padding=0, precision=None,
               rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=_pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=precision,
                         rngs=rngs)
    self.bn = FrozenBatchNorm(cout)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  """3x3, stride 1, pad 1, padding not counted (TF `avg_pool` / count_include_pad=False)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int = 0):
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nnx.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""

  def __init__(self, cin: int, pool_features: int, *, precision, rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch1x1 = conv(cin, 64, 1)
    self.branch5x5_1 = conv(cin, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(cin, pool_features, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction 35 -> 17)."""

  def __init__(self, cin: int, *, precision, rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch3x3 = conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(cin, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b/c/d/e (FIDInceptionC); output channels [0, 192) are branch1x1."""

  def __init__(self, cin: int, channels_7x7: int, *, precision, rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    c7 = channels_7x7
    self.branch1x1 = conv(cin, 192, 1)
    self.branch7x7_1 = conv(cin, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(cin, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction 17 -> 8)."""

  def __init__(self, cin: int, *, precision, rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.branch3x3_1 = conv(cin, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(cin, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1: average pool) and Mixed_7c (FIDInceptionE_2: max pool)."""

  def __init__(self, cin: int, *, pool: str, precision, rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    self.pool = pool
    self.branch1x1 = conv(cin, 320, 1)
    self.branch3x3_1 = conv(cin, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(cin, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(cin, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, 1, 1)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


def _resize_table(in_size: int, out_size: int):
  """Source indices and weights of TF1 bilinear resizing along one axis (align_corners=False),
  computed in float32 exactly as torch-fidelity's 'slow' method."""
  scale = np.float32(in_size / out_size)
  grid = np.arange(out_size, dtype=np.float32) * scale
  lo = grid.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (grid - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(x, size: int = INPUT_SIZE):
  """[N, H, W, C] float32 -> [N, size, size, C], TF 1.x `resize_bilinear` semantics (the
  source coordinate of output pixel i is i * in / out, no half-pixel offset)."""
  ylo, yhi, dy = _resize_table(x.shape[1], size)
  xlo, xhi, dx = _resize_table(x.shape[2], size)
  top, bottom = x[:, ylo], x[:, yhi]
  dx = jnp.asarray(dx)[None, None, :, None]
  row0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
  row1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
  return row0 + (row1 - row0) * jnp.asarray(dy)[None, :, None, None]


class InceptionV3(nnx.Module):
  """FID Inception-v3; `__call__(images uint8 [N, H, W, 3])` -> dict of 'pool' [N, 2048],
  'logits_unbiased' [N, 1008], 'spatial' [N, 2023] (float32)."""

  def __init__(self, *, precision: str | None = 'highest', rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, precision=precision, rngs=rngs)
    kw = dict(precision=precision, rngs=rngs)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, pool='avg', **kw)
    self.Mixed_7c = InceptionE(2048, pool='max', **kw)
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, precision=precision, rngs=rngs)
    self.precision = precision

  def __call__(self, images) -> dict[str, jax.Array]:
    x = resize_bilinear_tf1(images.astype(jnp.float32))
    x = (x - 128) / 128
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2)
    x = _max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    x = self.Mixed_6d(x)
    spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))
    logits = jnp.dot(pool, self.fc.kernel[...], precision=self.precision)
    return {'pool': pool, 'logits_unbiased': logits, 'spatial': spatial}


# ------------------------------------------------------------------------------------------
def load_inception(directory, *, precision: str | None = 'highest') -> InceptionV3:
  """Loads a model directory written by `disa-convert inception`."""
  from disa_jax.checkpoint import CheckpointError, read_meta, restore_params

  meta, _ = read_meta(directory)
  if meta.get('kind') != 'inception':
    raise CheckpointError(
      f'{directory} holds a {meta.get("kind")!r} model, not the FID Inception; create one with '
      '`disa-convert inception --torch-checkpoint pt_inception-2015-12-05-6726825d.pth --out DIR`')
  abstract = nnx.eval_shape(lambda: InceptionV3(precision=precision, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, restore_params(directory, state))


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _features_jit(state, images, *, graphdef):
  return nnx.merge(graphdef, state)(images)


class InceptionExtractor:
  """Runs the Inception over host images in fixed-size batches (one compilation per image
  size), data-parallel over this process's local devices.

  `__call__(images uint8 [N, H, W, 3])` -> dict of float32 numpy arrays (FEATURES).
  """

  def __init__(self, model: InceptionV3, *, batch_size: int = 64, devices=None):
    devices = list(devices or jax.local_devices())
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self.graphdef, state = nnx.split(model)
    if len(devices) > 1:
      mesh = jax.sharding.Mesh(np.array(devices), ('data',))
      self._rows = jax.sharding.NamedSharding(mesh, jax.P('data'))
      self.state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.P()))
    else:
      self._rows = devices[0]
      self.state = jax.device_put(state, devices[0])

  def __call__(self, images) -> dict[str, np.ndarray]:
    images = check_images(images)
    n, b = len(images), self.batch_size
    out = {k: [] for k in FEATURES}
    for lo in range(0, n, b):
      chunk = images[lo:lo + b]
      real = len(chunk)
      if real < b:
        chunk = np.concatenate([chunk, np.zeros((b - real, *chunk.shape[1:]), np.uint8)])
      feats = _features_jit(self.state, jax.device_put(chunk, self._rows),
                            graphdef=self.graphdef)
      for k in FEATURES:
        out[k].append(np.asarray(feats[k])[:real])
    if n == 0:
      return {'pool': np.zeros((0, POOL_DIM), np.float32),
              'logits_unbiased': np.zeros((0, NUM_LOGITS), np.float32),
              'spatial': np.zeros((0, SPATIAL_DIM), np.float32)}
    return {k: np.concatenate(v) for k, v in out.items()}


def check_images(images) -> np.ndarray:
  """Validates uint8 RGB images [N, H, W, 3] (what the evaluation reads from PNG files)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (as saved PNGs), got {images.dtype}; convert with '
                     'disa_jax.tokenizers.image.to_uint8')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be RGB [N, H, W, 3], got shape {images.shape}')
  return images


def default_batch_size() -> int:
  """Inception batch per call: 64 per accelerator, 8 on CPU."""
  return (8 if jax.default_backend() == 'cpu' else 64) * jax.local_device_count()
