"""xAR under the engine's sampler contract (`disa_jax.systems.base.Sampler`).

`XAREngineSampler` wraps `sampling.XARSampler` (the cell loop, one jitted function per cell and
step bucket: first pass with the previous clean cell + `lax.fori_loop` over the rest) for
the shared commands (disa-sample, disa-eval, disa-bench):
  plan(batch, *, steps, cfg, ...)   -> XARRunPlan (evaluations per cell, per-cell CFG), report()
  compile(plan)                     -> seconds; every cell function compiled ahead of time
  generate(labels, key, *, steps, image_ids, progress, cfg, timed)
                                    -> tokens (B, 256, 16) row-major (raster order, like MAR's)
  last_stats (XARRunStats), compile_log {('backbone', s, evals, batch): seconds}
Randomness per image, independent of the batch it lands in: image i (global id) draws its
cell-s noise from k_s = fold_in(fold_in(key, i), s), split into (k_init, k_steps): the initial
x (64, 16) ~ N(0, I) from k_init and the n_s - 1 Euler-Maruyama increments (n_s - 1, 64, 16)
from k_steps (the official sampler draws them per row, in this order; spec §6). So an evaluation
resumed with another batch split produces the same images.
MAR-only options the engine passes along (`max_timestep`, `cfg_schedule`, `temperature`) must be
inert (None, 'linear', 1.0); the xAR `validate` refuses other values with a one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disa_jax import sharding as shd
from disa_jax.errors import UserError
from disa_jax.systems.xar.model import cell_order
from disa_jax.systems.xar.sampling import XARSampler, cell_cfg


@dataclasses.dataclass(frozen=True)
class XARRunPlan:
  """The static shapes of one batch: one compiled function per (cell, evaluations, batch)."""

  batch_size: int
  steps: tuple[int, ...]            # Euler-Maruyama evaluations per cell
  cfg: float
  cell_tokens: int = 64

  @property
  def num_iter(self) -> int:
    return len(self.steps)

  @property
  def backbone_buckets(self) -> list:
    return [(s, n) for s, n in enumerate(self.steps)]

  @property
  def head_buckets(self) -> list:
    return []

  def token_steps(self) -> int:
    """Query tokens run per image (both CFG rows count once): the first pass of cell s >= 1
    also re-runs the previous clean cell."""
    n = self.cell_tokens
    return int(sum(n * k + (n if s else 0) for s, k in enumerate(self.steps)))

  def report(self) -> dict:
    n = self.token_steps()
    cells = len(self.steps)
    return {
      'num_iter': cells, 'steps_requested': list(self.steps), 'steps_actual': list(self.steps),
      'tokens_per_step': [self.cell_tokens] * cells,
      'cell_cfg': [round(cell_cfg(self.cfg, s, cells), 6) for s in range(cells)],
      'head_token_steps_per_image': n, 'head_token_steps_per_image_padded': n,
      'head_padding_waste': 0.0, 'encoder_padding_waste': 0.0,
      'backbone_buckets': cells, 'head_buckets': 0,
    }


@dataclasses.dataclass
class XARRunStats:
  plan: XARRunPlan
  wall_s: float = 0.0
  compile_s: float = 0.0
  compiles: dict = dataclasses.field(default_factory=dict)
  cell_s: list = dataclasses.field(default_factory=list)

  @property
  def sample_s(self) -> float:
    return self.wall_s

  def as_dict(self) -> dict:
    d = {'wall_s': round(self.wall_s, 4), 'compile_s': round(self.compile_s, 4),
         'compiles': dict(self.compiles)}
    if self.cell_s:
      d['cell_s'] = [round(t, 4) for t in self.cell_s]
    d.update(self.plan.report())
    return d


def check_inert(max_timestep=None, cfg_schedule='linear', temperature=1.0) -> None:
  if max_timestep is not None:
    raise UserError(f'xAR has no timestep clamp (max_timestep={max_timestep}); leave '
                    '--max_timestep unset')
  if cfg_schedule not in (None, 'linear'):
    raise UserError(f'xAR ramps CFG linearly over cells (official); cfg_schedule '
                    f'{cfg_schedule!r} is not available, use linear')
  if temperature not in (None, 1.0):
    raise UserError(f'the xAR sampler has no temperature (got {temperature}); leave '
                    '--temperature at 1.0')


class XAREngineSampler:
  """xAR sampler for the shared engine (module docstring). With the engine's `mesh` the batch
  is data-parallel over its data axis as in `XARSampler` (noise draws, cells, KV cache and
  tokens sharded along the batch); `self.mesh` lets the shared runner check batch sizes."""

  def __init__(self, model, *, cfg: float = 1.0, matmul_precision: str | None = None,
               mesh=None):
    self.inner = XARSampler(model, mesh=mesh)
    self.config = model.cfg
    self.mesh = mesh
    self.default_cfg = float(cfg)
    self.matmul_precision = matmul_precision or None
    self.compile_log: dict = {}
    self.last_stats: XARRunStats | None = None
    self._draw_fns: dict = {}
    self._raster = np.argsort(cell_order(model.cfg))   # raster index -> cell-major token

  @property
  def compile_count(self) -> int:
    return self.inner.compile_count

  def plan(self, batch_size: int, *, steps: Sequence[int], cfg: float | None = None,
           max_timestep=None, cfg_schedule='linear', temperature=1.0, **_) -> XARRunPlan:
    check_inert(max_timestep, cfg_schedule, temperature)
    steps = tuple(int(n) for n in steps)
    if len(steps) != self.config.num_cells:
      raise UserError(f'xAR needs one step count per cell ({self.config.num_cells}), got '
                      f'{list(steps)}')
    return XARRunPlan(batch_size=int(batch_size), steps=steps,
                      cfg=float(self.default_cfg if cfg is None else cfg),
                      cell_tokens=self.config.cell_tokens)

  def _precision(self):
    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def _draw_fn(self, s: int, n: int):
    """jit of (key, ids (B,)) -> (initial (B, 64, 16), steps (n - 1, B, 64, 16)) of cell s."""
    fn = self._draw_fns.get((s, n))
    if fn is None:
      shape = (self.config.cell_tokens, self.config.token_dim)

      def draw(key, ids):
        def one(i):
          k_init, k_steps = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), s))
          return (jax.random.normal(k_init, shape, jnp.float32),
                  jax.random.normal(k_steps, (n - 1, *shape), jnp.float32))

        initial, steps = jax.vmap(one)(ids)
        return initial, jnp.swapaxes(steps, 0, 1)

      kw = {} if self.mesh is None else dict(
        in_shardings=(shd.replicated(self.mesh), self.inner._sharding(0)),
        out_shardings=(self.inner._sharding(0), self.inner._sharding(1)))
      fn = self._draw_fns[(s, n)] = jax.jit(draw, **kw)
    return fn

  def draws(self, key, image_ids, steps: Sequence[int]) -> list:
    """Every cell's (initial, step noise) of images `image_ids` under `key` (the parity hook's
    format of `XARSampler.generate(noise=...)`)."""
    ids = self.inner.batch_sharded(jnp.asarray(np.asarray(image_ids), jnp.uint32))
    return [self._draw_fn(s, int(n))(key, ids) for s, n in enumerate(steps)]

  def compile(self, plan: XARRunPlan) -> float:
    """Compiles every cell function of `plan` from abstract shapes (no warm-up batch runs)
    and the noise draws; returns the seconds spent (0 when all were compiled before)."""
    missing = [(s, n) for s, n in enumerate(plan.steps)
               if not self.inner.compiled(s, n, plan.batch_size)]
    if not missing:
      return 0.0
    t0 = time.perf_counter()
    with self._precision():
      self.inner.compile_cells(plan.steps, plan.batch_size)
      for s, n in enumerate(plan.steps):     # the draw functions too (a few MB of normals)
        jax.block_until_ready(self._draw_fn(s, n)(jax.random.key(0),
                                                  jnp.zeros((plan.batch_size,), jnp.uint32)))
    dt = time.perf_counter() - t0
    for s, n in missing:
      self.compile_log[('backbone', s, n, plan.batch_size)] = dt / len(missing)
    return dt

  def generate(self, labels, key, *, steps: Sequence[int], image_ids=None,
               progress: Callable | None = None, cfg: float | None = None, timed: bool = False,
               max_timestep=None, cfg_schedule='linear', temperature=1.0, noise=None, **_):
    """Row-major tokens (B, 256, 16) (before the VAE's 1/0.2325 scaling) for class ids
    `labels` (B,). `image_ids` (default 0..B-1) select each image's random stream; `noise`
    (XARSampler's injected draws) replaces them; `timed` records each cell's time
    (synchronised); `progress(s)` after each cell."""
    b = int(np.shape(labels)[0])
    self.inner.check_batch(b)
    plan = self.plan(b, steps=steps, cfg=cfg, max_timestep=max_timestep,
                     cfg_schedule=cfg_schedule, temperature=temperature)
    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= self.config.class_num):
      raise UserError(f'class labels must be in [0, {self.config.class_num}), got '
                      f'{sorted(set(labels.tolist()))[:8]}')
    stats = XARRunStats(plan=plan)
    before = self.inner.compile_count
    stats.compile_s = self.compile(plan)
    ids = np.arange(b) if image_ids is None else np.asarray(image_ids)
    t_start = time.perf_counter()
    with self._precision():
      if noise is None:
        noise = self.draws(key, ids, plan.steps)
      st = self.inner.start(labels)
      for s, n in enumerate(plan.steps):
        t0 = time.perf_counter()
        initial, step_noise = noise[s]
        st = self.inner.step(st, num_steps=n, cfg=plan.cfg, initial=initial,
                             step_noise=step_noise)
        if timed:
          jax.block_until_ready(st.samples[-1])
          stats.cell_s.append(time.perf_counter() - t0)
        if progress is not None:
          progress(s)
      tokens = jnp.concatenate(st.samples, axis=1)[:, self._raster]
      tokens = jax.block_until_ready(tokens)
    stats.wall_s = time.perf_counter() - t_start
    stats.compiles = {'backbone': self.inner.compile_count - before}
    self.last_stats = stats
    return tokens
