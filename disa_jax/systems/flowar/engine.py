"""FlowAR under the engine's sampler contract (`disa_jax.systems.base.Sampler`).

`FlowAREngineSampler` wraps `sampling.FlowARSampler` (the scale loop, one jitted function per
scale: trunk step + `lax.fori_loop` Euler solve + next-scale input) for the shared commands:
  plan(batch, *, steps, cfg, guidance, ...)  -> FlowARPlan (requested / executed steps per
                                               scale, rows, per-scale CFG), report()-able
  compile(plan)                              -> seconds; AOT-compiles every scale function
                                               (jit -> lower -> compile) before timing
  generate(labels, key, *, steps, image_ids, progress, cfg, guidance, timed)
                                             -> tokens (B, 256, 16) row-major (the last scale)
  last_stats (FlowARRunStats), compile_log {('scale', s, solver, bucket, rows, batch): seconds,
                                            ('noise', s, rows, batch): seconds}
Randomness per image, independent of the batch it lands in: image i (global id) draws its
scale-s noise from k = fold_in(fold_in(fold_in(key, i), s), half), half 0 for its class row
and 1 for its null-class row under CFG (the official sampler draws every row independently,
spec §4), each (n_s, 16) standard normal. `timed=True` adds a synchronised pass of the trunk
alone per scale (`trunk_s`); the rest of a scale's time (flow head Euler solve, next-scale
input) is `head_s`. `solver` (constructor default, or per plan / generate call): 'euler'
(official) or 'heun' (2 N - 1 head evaluations for N grid steps; `disa_jax.diffusion.flow`).
`MAR`-only sampling options the engine passes along (`max_timestep`, `cfg_schedule`,
`temperature`) are accepted and must be inert (None, 'linear', 1.0): the FlowAR ODE sampler
has no timestep clamp and no noise temperature, and its CFG ramp over scales is the official
linear one (`FlowAR` system's `validate` refuses other values with a one-line error).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disa_jax import sharding as shd
from disa_jax.diffusion.flow import check_flow_solver, flowar_plan, num_evaluations, step_bucket
from disa_jax.errors import UserError
from disa_jax.systems.flowar.sampling import FlowARSampler, plan_args, scale_cfg


@dataclasses.dataclass(frozen=True)
class FlowARPlan:
  """The static shapes of one batch: per scale (tokens, requested steps, evaluations)."""

  batch_size: int
  scales: tuple[int, ...]
  steps: tuple[int, ...]             # requested flow steps per scale
  evals: tuple[int, ...]             # executed head evaluations per scale (Heun: 2 per step
  cfg: float                         # except the final Euler step)
  guidance: float
  solver: str = 'euler'              # 'euler' (official) | 'heun' (`disa_jax.diffusion.flow`)

  @property
  def use_cfg(self) -> bool:
    return self.cfg != 1.0

  @property
  def rows(self) -> int:
    return 2 * self.batch_size if self.use_cfg else self.batch_size

  @property
  def num_iter(self) -> int:
    return len(self.steps)

  @property
  def backbone_buckets(self) -> list:
    """Compiled functions per scale (trunk, head and next-scale input fused): one each."""
    return list(range(len(self.scales)))

  @property
  def head_buckets(self) -> list:
    return []

  def head_token_steps(self, padded: bool = False) -> int:
    del padded
    return int(sum(m * m * e for m, e in zip(self.scales, self.evals, strict=True)))

  def report(self) -> dict:
    n = self.head_token_steps()
    return {
      'num_iter': self.num_iter, 'steps_requested': list(self.steps),
      'steps_actual': list(self.evals), 'tokens_per_step': [m * m for m in self.scales],
      'scale_cfg': [round(scale_cfg(self.cfg, s, len(self.scales)), 6)
                    for s in range(len(self.scales))],
      'guidance': self.guidance, 'rows': self.rows,
      'head_token_steps_per_image': n, 'head_token_steps_per_image_padded': n,
      'head_padding_waste': 0.0, 'encoder_padding_waste': 0.0,
      'backbone_buckets': len(self.scales), 'head_buckets': 0, 'solver': self.solver,
    }


@dataclasses.dataclass
class FlowARRunStats:
  plan: FlowARPlan
  wall_s: float = 0.0
  compile_s: float = 0.0
  trunk_s: float = 0.0
  head_s: float = 0.0
  compiles: dict = dataclasses.field(default_factory=dict)

  @property
  def backbone_s(self) -> float:
    return self.trunk_s

  def as_dict(self) -> dict:
    d = {'wall_s': round(self.wall_s, 4), 'compile_s': round(self.compile_s, 4),
         'compiles': dict(self.compiles)}
    if self.trunk_s or self.head_s:
      d.update(trunk_s=round(self.trunk_s, 4), head_s=round(self.head_s, 4))
    d.update(self.plan.report())
    return d


def _check_inert(max_timestep=None, cfg_schedule='linear', temperature=1.0) -> None:
  if max_timestep is not None:
    raise UserError(f'FlowAR has no timestep clamp (max_timestep={max_timestep}); leave '
                    '--max_timestep unset')
  if cfg_schedule not in (None, 'linear'):
    raise UserError(f'FlowAR ramps CFG linearly over scales (official); cfg_schedule '
                    f'{cfg_schedule!r} is not available, use linear')
  if temperature not in (None, 1.0):
    raise UserError(f'the FlowAR Euler ODE sampler has no noise temperature (got '
                    f'{temperature}); leave --temperature at 1.0')


def _checked_solver(solver: str) -> str:
  try:
    return check_flow_solver(solver)
  except ValueError as e:
    raise UserError(f'{e} (--config.sampling.solver)') from None


class FlowAREngineSampler:
  """FlowAR sampler for the shared engine (see the module docstring). With the engine's
  `mesh` the batch is data-parallel over its data axis as in `FlowARSampler` (rows, noise, KV
  cache and tokens sharded along the batch, parameters replicated); `self.mesh` lets the
  shared runner check the batch size against it."""

  def __init__(self, model, *, cfg: float = 1.0, guidance: float = 1.0,
               matmul_precision: str | None = None, mesh=None, solver: str = 'euler'):
    self.solver = _checked_solver(solver)
    self.inner = FlowARSampler(model, mesh=mesh)
    self.config = model.cfg
    self.mesh = mesh
    self.default_cfg, self.default_guidance = float(cfg), float(guidance)
    self.matmul_precision = matmul_precision or None
    self.compile_log: dict = {}
    self._exes: dict = {}
    self._trunk_fns: dict = {}
    self.last_stats: FlowARRunStats | None = None

  @property
  def trace_counts(self):
    return self.inner.traces

  def plan(self, batch_size: int, *, steps: Sequence[int], cfg: float | None = None,
           guidance: float | None = None, max_timestep=None, cfg_schedule='linear',
           temperature=1.0, solver: str | None = None, **_) -> FlowARPlan:
    _check_inert(max_timestep, cfg_schedule, temperature)
    solver = self.solver if solver is None else _checked_solver(solver)
    scales = self.config.scales
    steps = tuple(int(s) for s in steps)
    if len(steps) != len(scales):
      raise UserError(f'FlowAR needs one step count per scale ({len(scales)}), got '
                      f'{list(steps)}')
    return FlowARPlan(batch_size=int(batch_size), scales=scales, steps=steps,
                      evals=tuple(num_evaluations(n, solver) for n in steps),
                      cfg=float(self.default_cfg if cfg is None else cfg),
                      guidance=float(self.default_guidance if guidance is None else guidance),
                      solver=solver)

  def _precision(self):
    import contextlib

    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def _plan_args(self, plan: FlowARPlan, s: int):
    """(padded device arrays, traced evaluation count) of scale s's solver plan (Euler or Heun,
    by `plan.solver`; `sampling.plan_args`)."""
    return plan_args(flowar_plan(plan.steps[s], scale_cfg(plan.cfg, s, len(plan.scales)),
                                 plan.guidance, solver=plan.solver))

  def _executable(self, plan: FlowARPlan, s: int, args):
    """The AOT-compiled scale function for these shapes (compiled and logged once per solver
    and step bucket: every evaluation count in a bucket shares it)."""
    key = ('scale', s, plan.solver, step_bucket(plan.evals[s]), plan.rows, plan.batch_size)
    exe = self._exes.get(key)
    if exe is None:
      t0 = time.perf_counter()
      with self._precision():
        lowered = self.inner._scale_fn(s).lower(*args, plan.batch_size)
        exe = (lowered.compile(), lowered.out_info)
      self.compile_log[key] = time.perf_counter() - t0
      self._exes[key] = exe
    return exe

  def compile(self, plan: FlowARPlan) -> float:
    """Compiles every scale function of `plan` (abstract shapes; nothing runs)."""
    before = sum(self.compile_log.values())
    c = self.config
    rows, d = plan.rows, c.width
    sds = jax.ShapeDtypeStruct
    tokens, cond, cache = sds((rows, 1, d), jnp.float32), sds((rows, d), jnp.float32), None
    for s, m in enumerate(plan.scales):
      noise = sds((rows, m * m, c.token_dim), jnp.float32)
      args = (self.inner.state, tokens, cond, cache, noise, *self._plan_args(plan, s),
              jnp.float32(1.0))
      _, (_, tokens, cache) = self._executable(plan, s, args)
      self._noise_exe(s, rows, plan.batch_size)
    return sum(self.compile_log.values()) - before

  def _noise_exe(self, s: int, rows: int, batch: int):
    """AOT-compiled draw of scale s's noise (rows, n_s, 16) from (key, image ids (batch,))."""
    k = ('noise', s, rows, batch)
    exe = self._exes.get(k)
    if exe is None:
      shape = (self.config.scales[s] ** 2, self.config.token_dim)

      def draw(key, ids):
        def one(i, half):
          k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, i), s), half)
          return jax.random.normal(k, shape, jnp.float32)

        cond = jax.vmap(one, (0, None))(ids, 0)
        if rows == batch:
          return cond
        return jnp.concatenate([cond, jax.vmap(one, (0, None))(ids, 1)])

      t0 = time.perf_counter()
      mesh = self.mesh
      kw = {} if mesh is None else dict(
        in_shardings=(shd.replicated(mesh), shd.batch_sharded(mesh)),
        out_shardings=shd.batch_sharded(mesh))
      exe = jax.jit(draw, **kw).lower(jax.random.key(0), jnp.zeros((batch,), jnp.uint32)).compile()
      self.compile_log[k] = time.perf_counter() - t0
      self._exes[k] = exe
    return exe

  def _trunk_time(self, st, s: int) -> float:
    fn = self._trunk_fns.get(s)
    if fn is None:
      from flax import nnx

      graphdef = self.inner.graphdef

      def trunk(state, tokens, cond, cache):
        return nnx.merge(graphdef, state).trunk_step(tokens, cond, s, cache)[0]

      fn = self._trunk_fns[s] = jax.jit(trunk)
      jax.block_until_ready(fn(self.inner.state, st.tokens, st.cond, st.cache))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(self.inner.state, st.tokens, st.cond, st.cache))
    return time.perf_counter() - t0

  def generate(self, labels, key, *, steps: Sequence[int], image_ids=None,
               progress: Callable | None = None, cfg: float | None = None,
               guidance: float | None = None, timed: bool = False, max_timestep=None,
               cfg_schedule='linear', temperature=1.0, noise=None, solver: str | None = None,
               **_):
    """Tokens (B, 256, 16) of the last scale for class ids `labels` (B,).

    `image_ids` (default 0..B-1) select each image's random stream under `key`; `noise`
    (5 arrays (R, n_s, 16)) replaces every draw (parity); `progress(s)` after each scale.
    """
    b = int(np.shape(labels)[0])
    self.inner.check_batch(b)
    plan = self.plan(b, steps=steps, cfg=cfg, guidance=guidance, max_timestep=max_timestep,
                     cfg_schedule=cfg_schedule, temperature=temperature, solver=solver)
    stats = FlowARRunStats(plan=plan)
    before = dict(self.inner.traces)
    stats.compile_s = self.compile(plan)
    labels = np.asarray(labels, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= self.config.class_num):
      raise UserError(f'class labels must be in [0, {self.config.class_num}), got '
                      f'{sorted(set(labels.tolist()))[:8]}')
    ids = self.inner.rows_sharded(
      jnp.asarray(np.arange(b) if image_ids is None else np.asarray(image_ids), jnp.uint32))
    t_start = time.perf_counter()
    st = self.inner.start(labels, plan.cfg)
    sample = None
    for s in range(len(plan.scales)):
      draw = (self.inner.rows_sharded(jnp.asarray(noise[s], jnp.float32)) if noise is not None
              else self._noise_exe(s, plan.rows, b)(key, ids))
      if timed:
        stats.trunk_s += self._trunk_time(st, s)
        t0 = time.perf_counter()
      args = (self.inner.state, st.tokens, st.cond, st.cache, draw, *self._plan_args(plan, s),
              jnp.float32(scale_cfg(plan.cfg, s, len(plan.scales))))
      exe, _ = self._executable(plan, s, args)
      sample, tokens, cache = exe(*args)
      st = dataclasses.replace(st, scale=s + 1, tokens=tokens, cache=cache)
      if timed:
        jax.block_until_ready(sample)
        stats.head_s += time.perf_counter() - t0
      if progress is not None:
        progress(s)
    jax.block_until_ready(sample)
    stats.wall_s = time.perf_counter() - t_start
    if timed:      # head_s so far = whole scale functions; the trunk pass is inside them
      stats.head_s = max(stats.head_s - stats.trunk_s, 0.0)
    stats.compiles = {'scale': sum(self.inner.traces.values()) - sum(before.values())}
    self.last_stats = stats
    return sample
