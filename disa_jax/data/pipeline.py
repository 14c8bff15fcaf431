"""grain input pipeline over a moments cache (the role of LTH14/mar `CachedFolder` + loader).

Per process: its shard of the records (`ShardByJaxProcess`-style contiguous slice) ->
shuffled with a fixed seed, reshuffled every epoch, repeated forever -> msgpack decode ->
random view choice (the image or its h-flip with probability `flip_prob`, as the official
loader's 50 % flip) -> batches of global_batch / process_count. The iterator state is a small
dict (`get_state` / `set_state`), saved with every training checkpoint.

Elements: {'mean', 'logvar': float32 [B, h, w, c], 'label': int32 [B]}.
"""

from __future__ import annotations

import numpy as np

from disa_jax.data import records


def _choose_view(flip_prob: float):
  def fn(rec, rng: np.random.Generator):
    flip = flip_prob > 0 and rng.random() < flip_prob
    sfx = '_flip' if flip else ''
    return {'mean': rec['mean' + sfx], 'logvar': rec['logvar' + sfx],
            'label': np.int32(rec['label'])}

  return fn


def make_dataset(cache_dir, split: str, *, global_batch: int, seed: int, flip_prob: float = 0.5,
                 process_index: int | None = None, process_count: int | None = None,
                 shuffle: bool = True):
  """The (infinite) grain MapDataset of batches for this process."""
  import grain

  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} is not divisible by {process_count} '
                     'processes; change --config.train.batch_size')
  src = records.data_source(cache_dir, split)
  n = len(src)
  lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
  local_batch = global_batch // process_count
  if hi - lo < local_batch:
    raise ValueError(f'each process gets {hi - lo} records of split {split!r}, fewer than its '
                     f'batch of {local_batch}; lower the batch size')
  ds = grain.MapDataset.source(src)[lo:hi].seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat().map(records.decode_record).random_map(_choose_view(flip_prob))
  return ds.batch(local_batch, drop_remainder=True)


def make_iterator(dataset, *, prefetch: int = 4, threads: int = 2):
  """A checkpointable iterator (`get_state`/`set_state`) with a small prefetch buffer."""
  import grain

  return iter(dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
