"""The caching stage: images -> tokenizer posterior moments (image and h-flip) -> ArrayRecord.

As LTH14/mar `main_cache.py`: every image is preprocessed once (ImageNet: ADM centre crop to
256, scaled to [-1, 1]), encoded together with its horizontal flip, and the posterior moments
(mean, logvar) of both are stored; training later picks one view at random and samples
z = (mean + std eps) * scale.

The encoder is injected: `encode_fn(images float32 [B, H, W, 3|1] in [-1, 1]) -> (mean,
logvar)`, each [B, h, w, c] NHWC. For ImageNet it is the KL-16 VAE
(`vae_encode_fn`), for the digits the identity pixel tokenizer (`disa_jax.data.digits`).

Multi-host: each process encodes a contiguous slice of every split and writes its own shards
(shard ids are global, so names never collide); process 0 writes meta.json at the end.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from disa_jax.data import records

_log = logging.getLogger(__name__)

EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _process():
  try:
    import jax

    return jax.process_index(), jax.process_count()
  except Exception:  # pragma: no cover - no backend
    return 0, 1


def cache_moments(out_dir, sources: dict[str, Sequence], encode_fn: EncodeFn, *,
                  preprocess: Callable[[dict], tuple[np.ndarray, int]], batch_size: int = 64,
                  records_per_shard: int = 10000, meta: dict | None = None,
                  overwrite: bool = False, progress: bool = False) -> Path:
  """Encodes every split of `sources` into `out_dir`; returns the directory.

  sources: split name -> random-access sequence of examples (`len`, `[i]`);
  preprocess(example) -> (image float32 [H, W, C] in [-1, 1], label).
  """
  out = Path(out_dir).expanduser()
  if (out / 'meta.json').exists() and not overwrite:
    raise records.CacheError(f'cache {out} already exists; pass --overwrite to rebuild it')
  pid, nproc = _process()
  if pid == 0:
    if out.exists():
      shutil.rmtree(out)
    out.mkdir(parents=True)
  _barrier('cache-start')
  counts, shape = {}, None
  for split, src in sources.items():
    n = len(src)
    counts[split] = n
    lo, hi = pid * n // nproc, (pid + 1) * n // nproc
    per_proc = max(1, math.ceil(max(hi - lo, 1) / records_per_shard))
    total_shards = per_proc * nproc
    bounds = [lo + (hi - lo) * j // per_proc for j in range(per_proc + 1)]
    t0 = time.perf_counter()
    for j in range(per_proc):
      recs = _encode_range(src, bounds[j], bounds[j + 1], encode_fn, preprocess, batch_size)
      first = True
      written = []
      for label, m, lv, mf, lvf in recs:
        if first:
          shape = list(m.shape)
          first = False
        written.append(records.encode_record(label, m, lv, mf, lvf))
      records.write_shard(out / records.shard_name(split, pid * per_proc + j, total_shards),
                          written)
      if progress:
        print(f'{split}: shard {pid * per_proc + j + 1}/{total_shards} '
              f'({bounds[j + 1] - lo}/{hi - lo} images, {time.perf_counter() - t0:.0f} s)')
  _barrier('cache-end')
  if pid == 0:
    records.write_meta(out, {'splits': counts, 'shape': shape, **(meta or {})})
  _barrier('cache-meta')
  return out


def _encode_range(src, lo, hi, encode_fn, preprocess, batch_size):
  for b0 in range(lo, hi, batch_size):
    idx = range(b0, min(b0 + batch_size, hi))
    imgs, labels = zip(*(preprocess(src[i]) for i in idx), strict=True)
    x = np.stack(imgs).astype(np.float32)
    mean, logvar = (np.asarray(a, np.float32) for a in encode_fn(x))
    mean_f, logvar_f = (np.asarray(a, np.float32) for a in encode_fn(x[:, :, ::-1]))
    if mean.shape[0] != len(idx) or mean.ndim != 4 or logvar.shape != mean.shape:
      raise records.CacheError(
        f'encode_fn returned mean {mean.shape} / logvar {logvar.shape} for {len(idx)} images; '
        'expected two [B, h, w, c] arrays')
    yield from zip(labels, mean, logvar, mean_f, logvar_f, strict=True)


def _barrier(name):
  try:
    import jax

    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'disa_jax:{name}')
  except ImportError:  # pragma: no cover
    pass
