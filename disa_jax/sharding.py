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

from disa_jax.errors import UserError

DATA = 'data'
FSDP = 'fsdp'

_log = logging.getLogger(__name__)
_distributed_initialized = False


class DistributedConfigError(UserError):
  """The JAX_* / DISA_JAX_DISTRIBUTED environment variables do not describe a valid job."""


COORDINATOR_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def distributed_args(env=None) -> dict | None:
  """Arguments for `jax.distributed.initialize` from the environment, or None (one process).

  - JAX_COORDINATOR_ADDRESS=host:port + JAX_NUM_PROCESSES + JAX_PROCESS_ID: explicit
    multi-process job (GPU clusters, local multi-process tests); all three or none.
  - DISA_JAX_DISTRIBUTED=1 alone: let JAX detect the cluster (Cloud TPU VMs, SLURM, Open MPI).
  - neither: a single-process run; nothing is initialised.
  """
  env = os.environ if env is None else env
  given = {k: env[k] for k in COORDINATOR_VARS if env.get(k)}
  if given:
    missing = [k for k in COORDINATOR_VARS if k not in given]
    if missing:
      raise DistributedConfigError(
        f'{", ".join(sorted(given))} set but {", ".join(missing)} missing; set all of '
        f'{", ".join(COORDINATOR_VARS)} (or none, with DISA_JAX_DISTRIBUTED=1 on Cloud TPU)')
    try:
      n, i = int(given['JAX_NUM_PROCESSES']), int(given['JAX_PROCESS_ID'])
    except ValueError:
      raise DistributedConfigError('JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got '
                                   f'{given["JAX_NUM_PROCESSES"]!r} and '
                                   f'{given["JAX_PROCESS_ID"]!r}') from None
    if n < 1 or not 0 <= i < n:
      raise DistributedConfigError(f'JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={n}), '
                                   f'got {i}')
    if ':' not in given['JAX_COORDINATOR_ADDRESS']:
      raise DistributedConfigError('JAX_COORDINATOR_ADDRESS must be host:port, got '
                                   f'{given["JAX_COORDINATOR_ADDRESS"]!r}')
    return dict(coordinator_address=given['JAX_COORDINATOR_ADDRESS'], num_processes=n,
                process_id=i)
  flag = env.get('DISA_JAX_DISTRIBUTED', '0')
  if flag not in ('0', '1', ''):
    raise DistributedConfigError(f'DISA_JAX_DISTRIBUTED must be 0 or 1, got {flag!r}')
  return {} if flag == '1' else None


def maybe_initialize_distributed() -> bool:
  """Initialises `jax.distributed` when this is one process of a multi-process job.

  See `distributed_args` for the environment variables (set by the scripts in `launch/`).
  A single-host run (the default) does nothing. Must run before anything touches a JAX
  backend; calling it again is a no-op.
  """
  global _distributed_initialized
  if _distributed_initialized:
    return True
  args = distributed_args()
  if args is None:
    return False
  try:
    jax.distributed.initialize(**args)
  except (ValueError, RuntimeError) as e:
    how = ('with JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID' if args else
           'with cluster auto-detection (DISA_JAX_DISTRIBUTED=1: Cloud TPU, SLURM, Open MPI; '
           'elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)')
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DistributedConfigError(f'jax.distributed.initialize failed {how}: {msg}') from None
  _distributed_initialized = True
  _log.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
  return True


def sync(name: str) -> None:
  """Barrier over all processes (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any process (collective; identity on one)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def broadcast_int(value: int) -> int:
  """Process 0's `value` (an int32) on every process (collective; identity on one)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


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


def put(tree, sharding: NamedSharding):
  """`jax.device_put(tree, sharding)` that also works when `sharding` spans several processes.

  `jax.device_put` refuses a `jax.Array` for a sharding with non-addressable devices; every
  leaf is then staged through host memory (typed PRNG keys through their key data), which
  assumes, as in every SPMD program, that all processes hold the same value.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)

  return jax.tree.map(one, tree)


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


def gather_rows(x) -> np.ndarray:
  """All rows of a batch-sharded global array on every process, as numpy (collective)."""
  if jax.process_count() == 1 or not hasattr(x, 'addressable_shards'):
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
