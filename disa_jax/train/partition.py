"""Shardings of the train state: replicated (data parallel) or FSDP over the `fsdp` mesh axis.

FSDP rule (big_vision `fsdp`): every array with at least `min_size` elements is split along
its largest dimension divisible by the `fsdp` axis size; everything else is replicated.
Parameters, EMA and the AdamW moments follow the same rule, so each device keeps 1/fsdp of
them; XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from disa_jax.sharding import FSDP


def leaf_spec(shape, fsdp_size: int, min_size: int = 1 << 14) -> P:
  if fsdp_size <= 1 or len(shape) == 0:
    return P()
  size = 1
  for d in shape:
    size *= d
  if size < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in dims:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = FSDP
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for every leaf of `abstract_state` (shape-dtype structs or arrays)."""
  fsdp_size = mesh.shape[FSDP] if FSDP in mesh.axis_names else 1
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, fsdp_size)),
                      abstract_state)
