"""The engine's run loop, shared by every system and command: the system's model / decoder /
sampler from a config (`disa_jax.systems.base`), class labels, the device mesh, and the one
batching loop (`sample_batches`) with its run totals."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from disa_jax import sharding as shd
from disa_jax import validation
from disa_jax.errors import UserError
from disa_jax.schedules import StepPlan
from disa_jax.systems.base import system_of

_log = logging.getLogger(__name__)


def step_plan(config_or_sampling, system=None) -> StepPlan:
  """The stage plan (requested steps per AR stage, clamp) of a config (or its `sampling`
  block, for MAR configs)."""
  if system is None:
    system = system_of(config_or_sampling if 'sampling' in config_or_sampling else None)
  sampling = config_or_sampling.get('sampling', config_or_sampling)
  return system.stage_plan(sampling)


def build_model(config, *, seed: int = 0):
  """(model, description): `config.checkpoint`, or random weights, of `config.system`."""
  return system_of(config).build_model(config, seed=seed)


def build_decoder(config, model):
  """The decoder from tokens to images for this config, or None (tokens only)."""
  return system_of(config).make_decoder(config, model)


def class_labels(num_images: int, classes: list[int], class_num: int, *,
                 order: str = 'cycle') -> np.ndarray:
  """Label of every image: `classes` cycled; without classes, 0..class_num-1 cycled
  (`order='cycle'`) or each class repeated num_images / class_num times in a row
  (`order='blocks'`, the official evaluation order; num_images must be a multiple)."""
  for c in classes:
    if not 0 <= c < class_num:
      raise UserError(f'class {c} is out of range for a model with {class_num} classes')
  if not classes and order == 'blocks':
    if num_images % class_num:
      raise UserError(
        f'--num_images ({num_images}) must be a multiple of the {class_num} classes so that '
        'every class gets the same number of images (or pass --classes)')
    return np.arange(class_num, dtype=np.int32).repeat(num_images // class_num)
  pool = np.asarray(classes if classes else np.arange(class_num), np.int32)
  return pool[np.arange(num_images) % len(pool)]


def make_sampler(model, config, mesh):
  return system_of(config).make_sampler(model, config, mesh)


@dataclasses.dataclass
class SamplingSetup:
  """What an entry point needs to sample: the model (and where it came from), the token
  decoder (None without a tokenizer), the device mesh, a sampler, and the seconds it took."""
  model: object
  source: str
  decoder: object
  mesh: object
  sampler: object
  load_s: float


def setup_sampling(config, *, seed: int) -> SamplingSetup:
  t0 = time.perf_counter()
  system = system_of(config)
  model, source = system.build_model(config, seed=seed)
  decoder = system.make_decoder(config, model)
  mesh = make_mesh(config)
  sampler = system.make_sampler(model, config, mesh)
  return SamplingSetup(model, source, decoder, mesh, sampler, time.perf_counter() - t0)


def make_mesh(config):
  n = config.runtime.get('num_devices', 0) or None
  if n and jax.process_count() > 1 and n != jax.device_count():
    raise UserError(f'runtime.num_devices={n} selects part of the {jax.device_count()} devices '
                     f'of a {jax.process_count()}-process job; use 0 (all devices)')
  fsdp = int(config.runtime.get('fsdp', 1) or 1)
  total = n or jax.device_count()
  if fsdp > 1 and total % fsdp:
    raise UserError(f'runtime.fsdp={fsdp} does not divide the {total} devices; use a divisor')
  return shd.make_mesh(n, fsdp=fsdp) if total > 1 else None


@dataclasses.dataclass
class Batch:
  ids: np.ndarray          # global image indices of this process's rows
  labels: np.ndarray
  tokens: np.ndarray       # [rows, L, C]
  all_ids: np.ndarray | None = None      # with `gather`: every image of the batch, in order
  all_tokens: np.ndarray | None = None


@dataclasses.dataclass
class RunTotals:
  compile_s: float = 0.0
  sample_s: float = 0.0
  images: int = 0
  stats: list = dataclasses.field(default_factory=list)


def check_batch_size(batch_size: int, mesh, flag: str = '--batch_size') -> None:
  """UserError unless `batch_size` is a multiple of the data-parallel devices of `mesh` (all
  processes): checked before any work, so it never surfaces from inside a compile."""
  mult = shd.data_size(mesh)
  if batch_size % mult:
    raise UserError(f'batch size {batch_size} must be a multiple of the {mult} data-parallel '
                    f'devices ({jax.process_count()} process(es)); change {flag} (or '
                    '--config.runtime.num_devices)')


def generate_checked(sampler, *args, **kwargs):
  """`sampler.generate(*args, **kwargs)`, then the cheap host-side non-finite check of this
  process's rows (`validation.check_finite_batch`, naming cfg / temperature when given): every
  path that writes images, tokens or metrics from samples goes through it or `sample_batches`.
  Returns the tokens as `generate` returned them."""
  tokens = sampler.generate(*args, **kwargs)
  validation.check_finite_batch(shd.local_rows(tokens), cfg=kwargs.get('cfg'),
                                temperature=kwargs.get('temperature'))
  return tokens


def sample_batches(sampler, labels: np.ndarray, *, batch_size: int, plan: StepPlan,
                   sampling, key, totals: RunTotals, start: int = 0,
                   on_step: Callable | None = None, gather: bool = False) -> Iterator[Batch]:
  """Yields this process's rows of each global batch of `labels` (global image order).

  With `gather`, `Batch.all_ids` / `all_tokens` also hold every image of the batch on every
  process (a cross-process all-gather). The last batch is padded (extra images generated
  with the last label, then dropped).
  """
  n = len(labels)
  check_batch_size(batch_size, sampler.mesh)
  warm = sampler.plan(batch_size, steps=plan.steps, max_timestep=plan.max_timestep,
                      cfg=sampling.cfg, cfg_schedule=sampling.cfg_schedule)
  totals.compile_s += sampler.compile(warm)
  for lo in range(start, n, batch_size):
    ids = np.arange(lo, lo + batch_size)
    real = ids < n
    lab = labels[np.minimum(ids, n - 1)]
    t0 = time.perf_counter()
    tokens = sampler.generate(
      lab, key, steps=plan.steps, max_timestep=plan.max_timestep, cfg=sampling.cfg,
      cfg_schedule=sampling.cfg_schedule, temperature=sampling.temperature, image_ids=ids,
      progress=on_step)
    st = sampler.last_stats
    totals.compile_s += st.compile_s
    totals.sample_s += time.perf_counter() - t0 - st.compile_s
    totals.images += int(real.sum())
    totals.stats.append(st)
    rows, local = shd.local_row_index(tokens, batch_size), shd.local_rows(tokens)
    validation.check_finite_batch(local, cfg=sampling.cfg, temperature=sampling.temperature)
    keep = real[rows]
    out = Batch(ids=ids[rows][keep], labels=lab[rows][keep], tokens=local[keep])
    if gather:
      out.all_ids, out.all_tokens = ids[real], shd.gather_rows(tokens)[real]
    yield out
