"""Cached posterior moments in ArrayRecord files (the role of LTH14/mar `main_cache.py`).

A cache directory holds, per split, shards `{split}-{i:05d}-of-{n:05d}.array_record` and one
`meta.json`:
  {"format": "disa_jax.moments_cache", "version": 1, "splits": {"train": N, ...},
   "shape": [h, w, c], "latent_scale": 0.2325, "tokenizer": "kl16" | "pixels", ...}
Each record is one image, msgpack-encoded (no pickle):
  label int, mean / logvar float32 [h, w, c] (NHWC) of the image, mean_flip / logvar_flip of
  its horizontal flip.
Shards are written to temporary names and renamed when complete; `meta.json` is written
last, so a cache without it is incomplete and is rebuilt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from disa_jax.errors import UserError

FORMAT = 'disa_jax.moments_cache'
VERSION = 1
FIELDS = ('mean', 'logvar', 'mean_flip', 'logvar_flip')


class CacheError(UserError):
  """A cache directory that cannot be used; the message says why and what to do."""


def encode_record(label: int, mean, logvar, mean_flip, logvar_flip) -> bytes:
  from flax import serialization

  return serialization.msgpack_serialize({
    'label': np.int32(label),
    'mean': np.asarray(mean, np.float32), 'logvar': np.asarray(logvar, np.float32),
    'mean_flip': np.asarray(mean_flip, np.float32),
    'logvar_flip': np.asarray(logvar_flip, np.float32),
  })


def decode_record(data: bytes) -> dict:
  from flax import serialization

  rec = serialization.msgpack_restore(data)
  rec['label'] = np.int32(rec['label'])
  return rec


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


def write_shard(path: Path, records: Iterable[bytes]) -> int:
  """Writes records to `path` atomically (temporary name, then rename). Returns the count."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = Path(path)
  tmp = path.with_name(path.name + '.tmp')
  writer = ArrayRecordWriter(str(tmp), 'group_size:1')
  n = 0
  try:
    for r in records:
      writer.write(r)
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


def write_meta(cache_dir, meta: dict) -> None:
  d = Path(cache_dir)
  tmp = d / 'meta.json.tmp'
  tmp.write_text(json.dumps({'format': FORMAT, 'version': VERSION, **meta}, indent=2,
                            sort_keys=True))
  os.replace(tmp, d / 'meta.json')


def read_meta(cache_dir) -> dict:
  d = Path(cache_dir).expanduser()
  path = d / 'meta.json'
  if not path.exists():
    raise CacheError(
      f'{d} is not a complete moments cache (no meta.json); build it with `disa-cache` '
      '(ImageNet) or let `disa-train` build the digits cache')
  meta = json.loads(path.read_text())
  if meta.get('format') != FORMAT:
    raise CacheError(f'{path} has format {meta.get("format")!r}, expected {FORMAT}')
  return meta


def shard_paths(cache_dir, split: str) -> list[str]:
  d = Path(cache_dir).expanduser()
  meta = read_meta(d)
  if split not in meta.get('splits', {}):
    raise CacheError(f'cache {d} has no split {split!r}; it has {sorted(meta["splits"])}')
  paths = sorted(str(p) for p in d.glob(f'{split}-*-of-*.array_record'))
  if not paths:
    raise CacheError(f'cache {d} lists split {split!r} but has no shard files for it')
  return paths


def data_source(cache_dir, split: str):
  """grain ArrayRecordDataSource over the split's shards (random access, len())."""
  import grain

  src = grain.sources.ArrayRecordDataSource(shard_paths(cache_dir, split))
  expected = read_meta(cache_dir)['splits'][split]
  if len(src) != expected:
    raise CacheError(f'cache {cache_dir} split {split!r} has {len(src)} records, meta.json '
                     f'says {expected}; rebuild the cache')
  return src
