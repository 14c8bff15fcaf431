"""xAR sampling: Python loop over cells, one AOT-compiled function per (cell, step bucket, batch).

Official: `xAR.sample_tokens` (`xAR_DiSA/models/xar.py`) and `sampler.euler_maruyama_sampler`
(`xAR_DiSA/models/sampler.py`), spec §5.4 and §6. For labels y (B,), cfg and n_s steps in cell s:
  cfg_s = (cfg - 1) s / 3 + 1                               (cell 0 is never guided)
  x = noise (B, 64, 16); grid t_0..t_{n-1} = linspace(1, 0.04, n), t_n = 0
  every step runs the network on 2B rows [x; x] with classes [y; 1000] at tau = trunc(1000 t_i):
    step 0:  tokens [previous clean cell (tau 0) ; x] (s >= 1) against the cache of cells < s-1,
             cell-causal mask; the cache becomes every key / value but the current cell's
    step i:  x alone against the frozen cache (64 s keys)
    d = (2 - t) v + x  per half (linear-path SDE drift); d = d_u + cfg_s (d_c - d_u) if cfg_s > 1
    else d_c;  x <- x + d dt + sqrt(2 t) sqrt(|dt|) xi  (xi ~ N(0, I) drawn before the call);
    the last step (0.04 -> 0) has no noise
  sample_s = x; after 4 cells the cell-major tokens are scattered back to the raster latent.
So the compiled shapes are bounded: per cell one function (first pass with 64 or 128 queries
and cache 64 (s - 1), then a `lax.fori_loop` over the remaining steps with cache 64 s); the
per-step t, dt, tau, noise scale, cfg_s and the step count itself are traced inputs. The plan
and noise arrays are zero-padded to `step_bucket(n)` (`disa_jax.diffusion.flow`, a multiple of
64) and the loop stops at the traced n, so one executable per (cell, bucket, batch) serves
every step count up to 64 (the official 40 / 50 and every DiSA schedule): padding costs only
the zero noise rows (bucket - n) x (B, 64, 16) floats, never an evaluation.
Implementation detail: the deterministic last step uses the same loop body with a noise
scale of exactly 0 (x + 0 xi = x), so the velocity is traced twice per cell, not three times.

Data parallel: with a `mesh` (`disa_jax.sharding.make_mesh`, as MAR's sampler) the batch is
sharded over the mesh's data axis: x, the previous cell, the samples, the initial noise and the
CFG rows [y; null] (labels, KV cache) along their leading axis, the per-step noise
(steps, B, 64, 16) along its batch axis 1; parameters, the plan and cfg_s are replicated; each
cell function is jitted with these in/out shardings. The 2B network rows are [x; x], so the
class / null halves of one image sit on different devices when B is split and the guided drift
combines them through XLA-inserted collectives (results equal the one-device run). The batch B
must be a multiple of the data-parallel devices.

Parity hook: `noise` replaces every random draw: a sequence of 4 pairs (initial (B, 64, 16),
steps (n_s - 1, B, 64, 16)) in the official draw order, or a callable noise(s, n_s) -> pair.

Precision: the official SDE state is float64; here it is float32 (x64 stays off) with the grid,
step sizes and noise scales computed in float64 host-side and rounded once (see
`tests/xar/test_xar_parity.py` for the measured differences against the float64 reference).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from disa_jax import sharding as shd
from disa_jax.diffusion.flow import (
  euler_maruyama_grid,
  linear_path_drift,
  padded_arrays,
  step_bucket,
  time_to_tau,
)
from disa_jax.errors import UserError
from disa_jax.systems.xar.model import XAR, to_raster


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """Host-side arrays of one cell's Euler-Maruyama solve (length n = evaluations).

  t: float32 t_cur; dt: t_next - t_cur (float64 difference, float32); tau: integer timesteps;
  noise_scale: sqrt(2 t_cur) sqrt(|dt|) (float64, rounded once), 0 for the last step.
  """

  t: np.ndarray
  dt: np.ndarray
  tau: np.ndarray
  noise_scale: np.ndarray

  @property
  def num_evals(self) -> int:
    return len(self.t)

  def arrays(self, length: int | None = None):
    """(t, dt, tau, noise_scale) as device arrays, zero-padded to `length` (>= num_evals)."""
    return padded_arrays((self.t, self.dt, self.tau, self.noise_scale), length)


def cell_plan(num_steps: int) -> CellPlan:
  """The official Euler-Maruyama plan of one cell with `num_steps` evaluations (>= 3)."""
  try:
    grid = euler_maruyama_grid(num_steps)
  except ValueError as e:
    raise UserError(f'{e}; raise the per-cell step count') from None
  t_cur = grid[:-1]
  dt = np.diff(grid)
  scale = np.sqrt(2.0 * t_cur) * np.sqrt(np.abs(dt))
  scale[-1] = 0.0
  return CellPlan(t=t_cur.astype(np.float32), dt=dt.astype(np.float32),
                  tau=time_to_tau(t_cur), noise_scale=scale.astype(np.float32))


def cell_cfg(cfg: float, s: int, num_cells: int = 4) -> float:
  """CFG ramp across cells: (cfg - 1) s / (num_cells - 1) + 1."""
  return (cfg - 1) * s / (num_cells - 1) + 1


def first_pass_mask(cell_tokens: int, s: int) -> np.ndarray:
  """(2n, 64 (s + 1)) bool mask of the first pass of cell s >= 1: queries [cell s-1 ; cell s],
  keys cells 0..s; the previous cell does not see the current one."""
  n = cell_tokens
  keys = np.arange((s + 1) * n) // n
  queries = np.concatenate([np.full(n, s - 1), np.full(n, s)])
  return keys[None, :] <= queries[:, None]


@dataclasses.dataclass
class XARSamplingState:
  """Where a `generate` call stands between cells.

  cell: index of the next cell (0..num_cells; num_cells = done).
  labels: (2B,) classes [y; null].
  cache: KV cache of cells < cell - 1 (((k, v) per encoder layer), ((k, v) per decoder
    layer), each (2B, H, 64 max(cell - 1, 0), hd)); None before cell 1.
  samples: the finished cells' samples (B, 64, 16), in cell order.
  """

  cell: int
  labels: jax.Array
  cache: tuple | None
  samples: list
  batch: int


class XARSampler:
  """Compiled xAR sampler for one model; `generate` runs the cell loop.

  Each cell function is lowered and compiled ahead of time once per (cell, step bucket, batch)
  (`executable`; `compile_cells` does it for a whole plan from abstract shapes, running
  nothing). `traces` counts traces per (cell, step bucket, batch) (each trace = one compile; the
  step count itself is traced, `step_bucket`); `compile_count` is their sum; `compiled(s, n,
  batch)` says whether cell s with n evaluations at that batch needs no new compile. `mesh`:
  optional device mesh; the batch is sharded over its data axis, parameters replicated (module
  docstring).
  """

  def __init__(self, model: XAR, *, mesh: Mesh | None = None):
    self.cfg = model.cfg
    self.mesh = mesh
    self.graphdef, state = nnx.split(model)
    self.state = state if mesh is None else shd.put(state, shd.replicated(mesh))
    self.traces: Counter = Counter()
    self._fns: dict = {}
    self._exes: dict = {}      # (cell, step bucket, batch) -> (compiled, out_info)

  @property
  def compile_count(self) -> int:
    return sum(self.traces.values())

  def compiled(self, s: int, num_steps: int, batch: int) -> bool:
    return (s, step_bucket(num_steps), batch) in self._exes

  def executable(self, s: int, args, batch: int):
    """(compiled, out_info) of cell s's function for `args` (state, ctx, x, labels, cache,
    plan, noise, cfg_s, evals: arrays or `jax.ShapeDtypeStruct`s), lowered and compiled on
    first use (one per cell, step bucket and batch)."""
    key = (s, int(args[5][0].shape[0]), batch)
    exe = self._exes.get(key)
    if exe is None:
      lowered = self._cell_fn(s).lower(*args, batch)
      exe = self._exes[key] = (lowered.compile(), lowered.out_info)
    return exe

  def compile_cells(self, steps: Sequence[int], batch: int) -> None:
    """Compiles every cell function of a run with `steps` evaluations per cell at `batch`
    from abstract shapes (nothing runs; each cell's cache shape comes from the previous cell's
    compiled outputs)."""
    self.check_batch(batch)
    sds = jax.ShapeDtypeStruct
    shape = (batch, self.cfg.cell_tokens, self.cfg.token_dim)
    labels, cache = sds((2 * batch,), jnp.int32), None
    for s, n in enumerate(steps):
      bucket = step_bucket(int(n))
      args = (self.state, sds(shape, jnp.float32), sds(shape, jnp.float32), labels, cache,
              cell_plan(int(n)).arrays(bucket), sds((bucket, *shape), jnp.float32),
              jnp.float32(1.0), jnp.int32(n))
      cache = self.executable(s, args, batch)[1][1]

  def check_batch(self, batch: int) -> None:
    n = shd.data_size(self.mesh)
    if batch % n:
      raise UserError(f'batch size {batch} must be a multiple of the {n} data-parallel devices; '
                      'change the batch size (or runtime.num_devices)')

  def batch_sharded(self, x, axis: int = 0):
    """`x` sharded over the mesh's data axis along `axis` (as is without a mesh)."""
    x = jnp.asarray(x)
    if self.mesh is None:
      return x
    return shd.put(x, self._sharding(axis))

  def _sharding(self, axis: int) -> NamedSharding:
    spec = (None,) * axis + (shd.batch_sharded(self.mesh).spec[0],)
    return NamedSharding(self.mesh, jax.P(*spec))

  def jit_shardings(self) -> dict:
    """in/out shardings of a cell function (empty without a mesh)."""
    if self.mesh is None:
      return {}
    rep, bat, steps = shd.replicated(self.mesh), self._sharding(0), self._sharding(1)
    #             state ctx  x    labels cache plan noise  cfg_s evals
    return dict(in_shardings=(rep, bat, bat, bat, bat, rep, steps, rep, rep), out_shardings=bat)

  def _cell_fn(self, s: int):
    if s in self._fns:
      return self._fns[s]
    graphdef = self.graphdef
    n_tok = self.cfg.cell_tokens

    def run(state, ctx, x, labels, cache, plan, noise, cfg_s, evals, batch):
      t, dt, tau, noise_scale = plan          # padded to the bucket; `evals` of them are used
      self.traces[(s, int(t.shape[0]), batch)] += 1
      model = nnx.merge(graphdef, state)
      rows = labels.shape[0]

      def drift(v, x, t_i):
        d = linear_path_drift(v, jnp.concatenate([x, x]), t_i)
        d_c, d_u = d[:batch], d[batch:]
        return jnp.where(cfg_s > 1, d_u + cfg_s * (d_c - d_u), d_c)

      def taus(value):
        return jnp.full((rows,), value, jnp.int32)

      cond = model.cell_condition(labels, taus(tau[0]))[:, None]
      tokens = jnp.concatenate([x, x])
      if s == 0:
        first, mask = 0, None
      else:
        prev = model.cell_condition(labels, taus(0))[:, None]
        cond = jnp.concatenate([prev, cond], axis=1)
        tokens = jnp.concatenate([jnp.concatenate([ctx, ctx]), tokens], axis=1)
        first, mask = s - 1, jnp.asarray(first_pass_mask(n_tok, s))
      v, kv = model.forward_cells(tokens, cond, first, cache=cache, mask=mask)
      cache = jax.tree.map(lambda a: a[:, :, :-n_tok], kv)
      x = x + drift(v[:, -n_tok:], x, t[0]) * dt[0] + noise_scale[0] * noise[0]

      def body(i, x):
        c = model.cell_condition(labels, taus(tau[i]))[:, None]
        v, _ = model.forward_cells(jnp.concatenate([x, x]), c, s, cache=cache)
        return x + drift(v, x, t[i]) * dt[i] + noise_scale[i] * noise[i]

      x = jax.lax.fori_loop(1, evals, body, x)
      return x, cache

    fn = jax.jit(run, static_argnums=(9,), **self.jit_shardings())   # 9: batch
    self._fns[s] = fn
    return fn

  def start(self, labels) -> XARSamplingState:
    """The state before cell 0 for integer `labels` (B,)."""
    labels = jnp.asarray(labels, jnp.int32)
    batch = int(labels.shape[0])
    self.check_batch(batch)
    both = self.batch_sharded(
      jnp.concatenate([labels, jnp.full((batch,), self.cfg.null_class, jnp.int32)]))
    return XARSamplingState(cell=0, labels=both, cache=None, samples=[], batch=batch)

  def step(self, st: XARSamplingState, *, num_steps: int, cfg: float, initial,
           step_noise) -> XARSamplingState:
    """Samples cell `st.cell` with `num_steps` evaluations; initial (B, 64, 16) and
    step_noise (num_steps - 1, B, 64, 16) are the draws; returns the next state."""
    s = st.cell
    plan = cell_plan(num_steps)
    shape = (st.batch, self.cfg.cell_tokens, self.cfg.token_dim)
    if tuple(initial.shape) != shape:
      raise UserError(f'injected initial noise of cell {s} has shape {tuple(initial.shape)}, '
                      f'expected {shape} (batch, tokens, channels)')
    if tuple(step_noise.shape) != (num_steps - 1, *shape):
      raise UserError(f'injected step noise of cell {s} has shape {tuple(step_noise.shape)}, '
                      f'expected {(num_steps - 1, *shape)} (steps - 1, batch, tokens, channels)')
    bucket = step_bucket(num_steps)
    noise = self.batch_sharded(jnp.concatenate([
      jnp.asarray(step_noise, jnp.float32),
      jnp.zeros((bucket - num_steps + 1, *shape), jnp.float32)]), axis=1)
    ctx = st.samples[-1] if st.samples else self.batch_sharded(jnp.zeros(shape, jnp.float32))
    args = (self.state, ctx, self.batch_sharded(jnp.asarray(initial, jnp.float32)), st.labels,
            st.cache, plan.arrays(bucket), noise,
            jnp.float32(cell_cfg(cfg, s, self.cfg.num_cells)), jnp.int32(num_steps))
    x, cache = self.executable(s, args, st.batch)[0](*args)
    return dataclasses.replace(st, cell=s + 1, cache=cache, samples=[*st.samples, x])

  def draws(self, key, s: int, num_steps: int, batch: int):
    """(initial, step noise) of cell s from a PRNG key (fold_in(key, s))."""
    k0, k1 = jax.random.split(jax.random.fold_in(key, s))
    shape = (batch, self.cfg.cell_tokens, self.cfg.token_dim)
    return (jax.random.normal(k0, shape, jnp.float32),
            jax.random.normal(k1, (num_steps - 1, *shape), jnp.float32))

  def generate(self, labels, *, steps: Sequence[int], cfg: float = 1.0, key=None,
               noise: Sequence | Callable | None = None, return_tokens: bool = False):
    """Latents (B, 16, 16, 16) (channel first, before the VAE's 1/0.2325 scaling); with
    `return_tokens` also the cell-major tokens (B, 256, 16).

    steps: evaluations per cell (`steps.py`); key: jax PRNG key; noise: injected draws (see the
    module docstring)."""
    num_cells = self.cfg.num_cells
    if len(steps) != num_cells:
      raise UserError(f'xAR needs one step count per cell ({num_cells}), got {list(steps)}')
    if noise is None and key is None:
      raise UserError('generate needs a PRNG `key` or injected `noise`')
    st = self.start(labels)
    for s in range(num_cells):
      n = int(steps[s])
      if noise is None:
        initial, step_noise = self.draws(key, s, n, st.batch)
      elif callable(noise):
        initial, step_noise = noise(s, n)
      else:
        initial, step_noise = noise[s]
      st = self.step(st, num_steps=n, cfg=cfg, initial=initial, step_noise=step_noise)
    tokens = jnp.concatenate(st.samples, axis=1)
    out = to_raster(tokens, self.cfg)
    return (out, tokens) if return_tokens else out


def generate(model: XAR, labels, *, steps: Sequence[int], cfg: float = 1.0, key=None,
             noise=None, mesh: Mesh | None = None):
  """One-shot convenience: `XARSampler(model, mesh=mesh).generate(...)`."""
  return XARSampler(model, mesh=mesh).generate(labels, steps=steps, cfg=cfg, key=key, noise=noise)
