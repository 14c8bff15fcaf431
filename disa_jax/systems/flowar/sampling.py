"""FlowAR sampling: Python loop over scales, one jitted function per (scale, step count).

Official: `FlowAR.sample_tokens` (`FlowAR_DiSA/models/flowar.py`) and `sampler.euler_sampler`
(`FlowAR_DiSA/models/sampler.py`), spec §4. For labels y (B,), cfg, guidance g and requested
steps T_s per scale:
  rows R = 2B when cfg != 1 (rows [0, B) class y, rows [B, 2B) the null class), else B
  for s = 0..4:
    z = trunk block s (KV cache of blocks < s; s = 0: the class embedding is the token)
    cfg_s = (cfg - 1) * s / 4 + 1                          (scale 0 is never guided)
    x = noise (R, n_s, 16)                                  (every row its own draw)
    Euler (Heun: `solver='heun'`) over the grid of T_s (`disa_jax.diffusion.flow`): guided
      steps (cfg_s > 1 and t_cur <= g; Heun: per evaluation, at its own time) evaluate
      [x_c; x_c] with [z_c; z_u] and write v_u + cfg_s (v_c - v_u) to both halves; unguided
      steps evaluate x as it is (each half evolves on its own)
    sample_s = first B rows; if s < 4: u = next_scale_input(sample_s) duplicated to both halves,
      tokens of block s + 1 = z_proj(u)
  result: sample_4 (B, 256, 16) -> (B, 16, 16, 16) channel-first latent (`unpatchify`).
Each scale is one jitted function (trunk step + `lax.fori_loop` Euler + next-scale input); its
static shape is (scale, solver, step bucket, rows): the per-step times/taus/guided flags, cfg_s
and the evaluation count itself are traced inputs, the plan zero-padded to
`step_bucket(evaluations)` (`disa_jax.diffusion.flow`, a multiple of 64; padded entries are never
evaluated). A run therefore traces at most 5 functions per batch size, and the official and
every DiSA schedule up to 64 evaluations per scale share them.

Data parallel: with a `mesh` (`disa_jax.sharding.make_mesh`, as MAR's sampler) every per-row
array (tokens, cond, noise, the KV cache, the samples) is sharded over the mesh's data axis along
rows, parameters and the Euler plan are replicated; each scale function is jitted with these
in/out shardings. Under CFG the rows are [class half; null half], so a device's rows are not
always pairs: the guided combine reads across devices (XLA inserts the collectives; results are
the same as on one device). The batch B must be a multiple of the data-parallel devices.

Parity hook: `noise` replaces every random draw: a sequence of 5 arrays (R, n_s, 16) or a callable
noise(s, shape) -> array.

Precision: the official ODE state is float64; here it is float32 (x64 stays off) with the step
sizes computed in float64 host-side and rounded once. Measured on the tiny test models (max
|a - b| / max |b| of the final tokens, noise injected, weights N(0, 0.25)-scaled):
  torch reference, float32 state vs its official float64 state:  0.7e-6 .. 3.5e-6
    (25 x 5 without CFG 1.2e-6 / 0.7e-6 for head v1 / v2; DiSA 25 -> 15 with CFG 2.3e-6 / 1.9e-6;
    50 x 5 with CFG 3.5e-6 / 2.0e-6)
  this port vs the float64 reference:                             1e-6 .. 4e-6
so the state precision accounts for essentially the whole difference; the parity tests bound it
by 1e-5 (tests/flowar/test_flowar_parity.py). `reference.flowar.euler_sampler(state_dtype=)`
reproduces the measurement.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from disa_jax import sharding as shd
from disa_jax.diffusion.flow import (
  cfg_combine,
  check_flow_solver,
  flow_solve,
  flowar_plan,
  step_bucket,
)
from disa_jax.errors import UserError
from disa_jax.systems.flowar.model import FlowAR
from disa_jax.systems.flowar.next_scale import next_scale_input


@dataclasses.dataclass
class FlowARSamplingState:
  """Where a `generate` call stands between scales.

  scale: index of the next scale to sample (0..num_scales; num_scales = done).
  tokens: (R, n_scale, D) trunk input of the next scale (scale 0: the class embeddings).
  cond: (R, D) adaLN condition (class embedding of each row; null class in the second half).
  cache: KV cache of blocks < scale, ((k, v) per encoder layer, (k, v) per decoder layer),
    each (R, H, start_scale, hd); None before scale 0.
  samples: the cond-half samples (B, n_s, 16) of the finished scales.
  batch: B; rows: R (2B with CFG, else B).
  """

  scale: int
  tokens: jax.Array
  cond: jax.Array
  cache: tuple | None
  samples: list
  batch: int
  rows: int


def scale_cfg(cfg: float, s: int, num_scales: int) -> float:
  """CFG ramp across scales: (cfg - 1) s / (num_scales - 1) + 1."""
  return (cfg - 1) * s / (num_scales - 1) + 1


def unpatchify(tokens, side: int = 16):
  """(B, side^2, C) row-major tokens -> (B, C, side, side)."""
  b, n, c = tokens.shape
  return tokens.reshape(b, side, side, c).transpose(0, 3, 1, 2)


class FlowARSampler:
  """Compiled FlowAR sampler for one model; `generate` runs the scale loop.

  `traces` counts traces per (scale, step bucket, rows, batch, solver) key (each trace = one
  compile; the evaluation count itself is traced);
  `compile_count` is their sum. `mesh`: optional device mesh; rows sharded over its data axis,
  parameters replicated (module docstring).
  """

  def __init__(self, model: FlowAR, *, mesh: Mesh | None = None):
    self.cfg = model.cfg
    self.mesh = mesh
    self.graphdef, state = nnx.split(model)
    self.state = state if mesh is None else shd.put(state, shd.replicated(mesh))
    self.traces: Counter = Counter()
    self._fns: dict = {}

  @property
  def compile_count(self) -> int:
    return sum(self.traces.values())

  def rows_sharded(self, x):
    """`x` (leading axis = rows/batch) sharded over the mesh's data axis (as is without one)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return shd.put(jnp.asarray(x), shd.batch_sharded(self.mesh))

  def check_batch(self, batch: int) -> None:
    n = shd.data_size(self.mesh)
    if batch % n:
      raise UserError(f'batch size {batch} must be a multiple of the {n} data-parallel devices; '
                      'change the batch size (or runtime.num_devices)')

  def jit_shardings(self) -> dict:
    """in/out shardings of a scale function (empty without a mesh): state, plan and cfg_s
    replicated; tokens, cond, KV cache, noise and all outputs sharded along rows."""
    if self.mesh is None:
      return {}
    rep, bat = shd.replicated(self.mesh), shd.batch_sharded(self.mesh)
    #                         state tokens cond cache noise plan evals cfg_s
    return dict(in_shardings=(rep, bat, bat, bat, bat, rep, rep, rep), out_shardings=bat)

  def _scale_fn(self, s: int):
    if s in self._fns:
      return self._fns[s]
    cfg = self.cfg
    last = len(cfg.scales) - 1
    graphdef = self.graphdef

    def run(state, tokens, cond, cache, noise, plan, evals, cfg_s, batch):
      rows = tokens.shape[0]
      solver = 'euler' if len(plan) == 4 else 'heun'
      self.traces[(s, int(plan[0].shape[0]), rows, batch, solver)] += 1
      model = nnx.merge(graphdef, state)
      z, cache = model.trunk_step(tokens, cond, s, cache)
      doubled = rows == 2 * batch

      def velocity(x, t, tau, guided):
        taus = jnp.full((rows,), tau, jnp.int32)
        if not doubled:
          return model.velocity(x, taus, z, s)
        xin = jnp.where(guided, jnp.concatenate([x[:batch], x[:batch]]), x)
        v = model.velocity(xin, taus, z, s)
        vg = cfg_combine(v[:batch], v[batch:], cfg_s)
        return jnp.where(guided, jnp.concatenate([vg, vg]), v)

      x = flow_solve(velocity, noise.astype(jnp.float32), plan, evals)
      sample = x[:batch]
      if s == last:
        return sample, None, cache
      u = next_scale_input(sample, cfg.scales[s], cfg.scales[s + 1])
      if doubled:
        u = jnp.concatenate([u, u])
      return sample, model.embed_tokens(u), cache

    fn = jax.jit(run, static_argnums=(8,), **self.jit_shardings())   # 8: batch
    self._fns[s] = fn
    return fn

  def start(self, labels, cfg: float) -> FlowARSamplingState:
    """The state before scale 0 for integer `labels` (B,)."""
    labels = jnp.asarray(labels, jnp.int32)
    batch = labels.shape[0]
    self.check_batch(batch)
    model = nnx.merge(self.graphdef, self.state)
    if cfg != 1.0:
      labels = jnp.concatenate([labels, jnp.full((batch,), self.cfg.null_class, jnp.int32)])
    cond = self.rows_sharded(model.class_embedding(labels))
    return FlowARSamplingState(scale=0, tokens=self.rows_sharded(cond[:, None, :]), cond=cond, cache=None,
                               samples=[], batch=batch, rows=int(labels.shape[0]))

  def step(self, st: FlowARSamplingState, *, num_steps: int, cfg: float, guidance: float,
           noise, solver: str = 'euler') -> FlowARSamplingState:
    """Samples scale `st.scale` with `num_steps` requested flow steps of `solver` ('euler', the
    official sampler, or 'heun'; `disa_jax.diffusion.flow`); returns the next state."""
    s = st.scale
    n_s = self.cfg.scales[s] ** 2
    cfg_s = scale_cfg(cfg, s, len(self.cfg.scales))
    plan = flowar_plan(num_steps, cfg_s, guidance, solver=solver)
    want = (st.rows, n_s, self.cfg.token_dim)
    if tuple(noise.shape) != want:
      raise UserError(f'injected noise for scale {s} has shape {tuple(noise.shape)}, expected '
                      f'{want} (rows, tokens, channels)')
    sample, tokens, cache = self._scale_fn(s)(
      self.state, st.tokens, st.cond, st.cache,
      self.rows_sharded(jnp.asarray(noise, jnp.float32)), *plan_args(plan), jnp.float32(cfg_s),
      st.batch)
    return dataclasses.replace(st, scale=s + 1, tokens=tokens, cache=cache,
                               samples=[*st.samples, sample])

  def generate(self, labels, *, steps: Sequence[int], cfg: float = 1.0, guidance: float = 1.0,
               key=None, noise: Sequence | Callable | None = None, return_state: bool = False,
               solver: str = 'euler'):
    """Latents (B, 16, 16, 16) (channel first, before the VAE's 1/0.2325 scaling).

    steps: requested flow steps per scale (`steps.py`); key: jax PRNG key for the noise (draw s
    uses fold_in(key, s)); noise: injected draws instead (see module docstring); solver: 'euler'
    (official) or 'heun' (`disa_jax.diffusion.flow`).
    """
    try:
      check_flow_solver(solver)
    except ValueError as e:
      raise UserError(str(e)) from None
    num_scales = len(self.cfg.scales)
    if len(steps) != num_scales:
      raise UserError(f'FlowAR needs one step count per scale ({num_scales}), got {list(steps)}')
    if noise is None and key is None:
      raise UserError('generate needs a PRNG `key` or injected `noise`')
    st = self.start(labels, cfg)
    for s in range(num_scales):
      shape = (st.rows, self.cfg.scales[s] ** 2, self.cfg.token_dim)
      if noise is None:
        draw = jax.random.normal(jax.random.fold_in(key, s), shape, jnp.float32)
      elif callable(noise):
        draw = noise(s, shape)
      else:
        draw = noise[s]
      st = self.step(st, num_steps=int(steps[s]), cfg=cfg, guidance=guidance, solver=solver,
                     noise=np.asarray(draw) if not isinstance(draw, jax.Array) else draw)
    out = unpatchify(st.samples[-1], self.cfg.scales[-1])
    return (out, st) if return_state else out


def plan_args(plan) -> tuple:
  """(plan arrays padded to the step bucket, traced evaluation count) of a solver plan."""
  return plan.arrays(step_bucket(plan.num_evals)), jnp.int32(plan.num_evals)


def generate(model: FlowAR, labels, *, steps: Sequence[int], cfg: float = 1.0,
             guidance: float = 1.0, key=None, noise=None, mesh: Mesh | None = None,
             solver: str = 'euler'):
  """One-shot convenience: `FlowARSampler(model, mesh=mesh).generate(...)`."""
  return FlowARSampler(model, mesh=mesh).generate(labels, steps=steps, cfg=cfg, guidance=guidance, key=key,
                                       noise=noise, solver=solver)
