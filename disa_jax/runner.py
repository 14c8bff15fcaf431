"""Glue shared by the entry points: models from configs, step plans, labels, batched runs."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from disa_jax import sharding as shd
from disa_jax import validation
from disa_jax.checkpoint import load_mar
from disa_jax.models.mar import MAR, MARConfig
from disa_jax.sampler.generate import Sampler
from disa_jax.schedules import StepPlan, resolve_steps

_log = logging.getLogger(__name__)


def step_plan(sampling) -> StepPlan:
  """The per-AR-step requested steps and clamp from a `config.sampling` block."""
  max_t = sampling.get('max_timestep', None)
  if max_t is None:
    max_t = 'preset'
  elif max_t < 0:
    max_t = None
  return resolve_steps(num_iter=sampling.num_iter, preset=sampling.preset,
                       strategy=sampling.strategy, upper=sampling.upper_steps,
                       lower=sampling.lower_steps, steps=sampling.steps or None,
                       max_timestep=max_t)


def build_model(config, *, seed: int = 0) -> tuple[MAR, str]:
  """(model, description): the checkpoint in `config.checkpoint`, or random weights."""
  model_cfg = dict(config.model)
  if config.get('checkpoint'):
    runtime = {k: model_cfg[k] for k in ('dtype', 'attn_splits') if k in model_cfg}
    model = load_mar(config.checkpoint, expect_config=model_cfg, overrides=runtime)
    return model, f'checkpoint {config.checkpoint}'
  cfg = MARConfig.from_dict(model_cfg)
  return MAR(cfg, rngs=nnx.Rngs(seed)), 'RANDOM WEIGHTS (no checkpoint given)'


def build_tokenizer(config, model_cfg: MARConfig):
  """The decoder from tokens to images for this config, or None (tokens only)."""
  from disa_jax import tokenizer as tok

  tk = config.tokenizer
  if tk.kind == 'pixels':
    return tok.PixelTokenizer(model_cfg, scale=tk.scale)
  if tk.kind == 'kl16' and tk.get('vae'):
    from disa_jax.checkpoint import load_vae

    rt = config.runtime
    n = rt.get('num_devices', 0)
    vae = load_vae(tk.vae, overrides={'dtype': tk.get('dtype', 'float32')})
    return tok.VAETokenizer(model_cfg, vae, scale=tk.scale,
                            matmul_precision=rt.get('matmul_precision') or None,
                            devices=jax.local_devices()[:n] if n else None)
  return None


def class_labels(num_images: int, classes: list[int], class_num: int) -> np.ndarray:
  """Label of every image: `classes` cycled, or 0..class_num-1 cycled when empty."""
  for c in classes:
    if not 0 <= c < class_num:
      raise ValueError(f'class {c} is out of range for a model with {class_num} classes')
  pool = np.asarray(classes if classes else np.arange(class_num), np.int32)
  return pool[np.arange(num_images) % len(pool)]


def make_sampler(model, config, mesh) -> Sampler:
  rt = config.runtime
  return Sampler(model, mesh=mesh, enc_bucket=rt.enc_bucket, max_head_waste=rt.max_head_waste,
                 matmul_precision=rt.matmul_precision or None)


@dataclasses.dataclass
class SamplingSetup:
  """What an entry point needs to sample: the model (and where it came from), the token
  decoder (None without a tokenizer), the device mesh, a sampler, and the seconds it took."""
  model: MAR
  source: str
  decoder: object
  mesh: object
  sampler: Sampler
  load_s: float


def setup_sampling(config, *, seed: int) -> SamplingSetup:
  t0 = time.perf_counter()
  model, source = build_model(config, seed=seed)
  decoder = build_tokenizer(config, model.config)
  mesh = make_mesh(config)
  sampler = make_sampler(model, config, mesh)
  return SamplingSetup(model, source, decoder, mesh, sampler, time.perf_counter() - t0)


def make_mesh(config):
  n = config.runtime.get('num_devices', 0) or None
  if n and jax.process_count() > 1 and n != jax.device_count():
    raise ValueError(f'runtime.num_devices={n} selects part of the {jax.device_count()} devices '
                     f'of a {jax.process_count()}-process job; use 0 (all devices)')
  return shd.make_mesh(n) if (n or jax.device_count()) > 1 else None


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


def sample_batches(sampler: Sampler, labels: np.ndarray, *, batch_size: int, plan: StepPlan,
                   sampling, key, totals: RunTotals, start: int = 0,
                   on_step: Callable | None = None, gather: bool = False) -> Iterator[Batch]:
  """Yields this process's rows of each global batch of `labels` (global image order).

  With `gather`, `Batch.all_ids` / `all_tokens` also hold every image of the batch on every
  process (a cross-process all-gather). The last batch is padded (extra images generated
  with the last label, then dropped).
  """
  n = len(labels)
  mult = shd.data_size(sampler.mesh)   # devices of all processes
  if batch_size % mult:
    raise ValueError(f'batch size {batch_size} must be a multiple of the {mult} data-parallel '
                     f'devices ({jax.process_count()} process(es)); change --batch_size')
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
