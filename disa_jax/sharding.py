"""Device mesh, shardings and multi-host helpers.

One `data` mesh axis (optionally `fsdp` for training large variants): the batch is sharded
over it, parameters are replicated. The same code runs on one CPU, on 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on a TPU pod; `jax.distributed`
is initialised only when running multi-process.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'
FSDP = 'fsdp'

_log = logging.getLogger(__name__)
_distributed_initialized = False


def maybe_initialize_distributed() -> bool:
  """Initialises `jax.distributed` when this is one process of a multi-process job.

  Triggered by DISA_JAX_DISTRIBUTED=1 (set by the launch scripts; Cloud TPU VMs then
  auto-detect the coordinator) or by JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES +
  JAX_PROCESS_ID for GPU clusters. A single-host run (the default) does nothing. Must run
  before anything touches a JAX backend.
  """
  global _distributed_initialized
  if _distributed_initialized:
    return True
  coordinator = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if coordinator:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ['JAX_NUM_PROCESSES']),
      process_id=int(os.environ['JAX_PROCESS_ID']),
    )
  elif os.environ.get('DISA_JAX_DISTRIBUTED', '0') == '1':
    jax.distributed.initialize()
  else:
    return False
  _distributed_initialized = True
  _log.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
  return True


def make_mesh(num_devices: int | None = None, *, fsdp: int = 1) -> Mesh:
  """A ('data',) mesh over `num_devices` (default: all), or ('data', 'fsdp') when fsdp > 1."""
  n = jax.device_count() if num_devices is None else int(num_devices)
  if n < 1 or n > jax.device_count():
    raise ValueError(f'asked for {n} devices but {jax.device_count()} are available')
  if n % fsdp:
    raise ValueError(f'{n} devices cannot be split into fsdp groups of {fsdp}')
  devices = jax.devices()[:n]
  if fsdp == 1:
    return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,), devices=devices)
  return jax.make_mesh((n // fsdp, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis that holds data."""
  axes = tuple(a for a in mesh.axis_names if a in (DATA, FSDP))
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def data_size(mesh: Mesh | None) -> int:
  """How many ways the batch is split."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in mesh.axis_names if a in (DATA, FSDP)]))


def process_batch_slice(global_batch: int) -> slice:
  """Rows of a global batch that belong to this process (contiguous, equal parts)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch % n:
    raise ValueError(f'global batch {global_batch} is not divisible by {n} processes')
  per = global_batch // n
  return slice(i * per, (i + 1) * per)


def global_batch_array(local: np.ndarray, mesh: Mesh | None):
  """Builds the global batch-sharded array from this process's rows (single host: all rows)."""
  if mesh is None:
    return jax.numpy.asarray(local)
  return jax.make_array_from_process_local_data(batch_sharded(mesh), np.asarray(local))


def _local_shards(x):
  """Addressable shards of a batch-sharded array, one per distinct batch slice, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, out = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # skip copies replicated over a non-batch axis
      seen.add(start)
      out.append(s)
  return out


def local_row_index(x, global_batch: int) -> np.ndarray:
  """Global row indices of this process's rows of `x` (all rows on a single process)."""
  if jax.process_count() == 1 or not hasattr(x, 'addressable_shards'):
    return np.arange(global_batch)
  idx = []
  for s in _local_shards(x):
    sl = s.index[0]
    idx.extend(range(sl.start or 0, sl.stop if sl.stop is not None else global_batch))
  return np.asarray(idx)


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order, as numpy."""
  if jax.process_count() == 1 or not hasattr(x, 'addressable_shards'):
    return np.asarray(x)
  return np.concatenate([np.asarray(s.data) for s in _local_shards(x)], axis=0)
