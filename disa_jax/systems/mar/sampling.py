"""MAR sampling with DiSA: the AR loop (plain Python) over jitted backbone and head buckets.

Semantics are the official `MAR.sample_tokens` (LTH14/mar) with DiSA's per-AR-step step
counts (Qinyu-Allen-Zhao/DiSA):
- each image has its own uniform random generation order; at AR step s the first m_next(s)
  entries of the order stay masked and the ones between m_next and m_cur are predicted
  (the last step predicts everything left);
- the encoder sees the class buffer and the visible tokens; the decoder gives one condition
  vector per predicted token; the head samples those tokens with the step count of this AR
  step; CFG duplicates the batch with `fake_latent` as the unconditional class vector.

Static shapes: per AR step the backbone is compiled per encoder bucket V_pad and the head
per (A, n_pad) (see `plan.py`); everything that changes per step without changing shapes
(slice offsets, CFG scale, timestep tables) is a traced argument.

Randomness is per image: image i of a run with key k uses fold_in(k, image_id[i]); its order
comes from stream 0 and the noise of the token at position p from stream 1 folded with p. So
an image does not depend on the batch it is in, on padding, or on the device layout.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from disa_jax import sharding as shd
from disa_jax.diffusion.ddpm import (
  MODULATION_BUDGET_BYTES,
  check_solver,
  device_tables,
  p_sample_loop,
)
from disa_jax.engine import aot
from disa_jax.systems.mar.plan import SamplingPlan, make_plan

ORDER_STREAM, NOISE_STREAM = 0, 1



def _positions(orders, start, count, size: int, seq_len: int):
  """Ascending positions orders[:, start:start+count], padded to static `size`.

  Returns (pos [B, size] int32, valid [B, size] bool); padding repeats the first position.
  """
  if size == 0:
    b = orders.shape[0]
    return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
  ext = jnp.concatenate([orders, orders], axis=1)
  window = jax.lax.dynamic_slice_in_dim(ext, start, size, axis=1)
  valid = jnp.arange(size) < count
  srt = jnp.sort(jnp.where(valid, window, seq_len), axis=1)
  pos = jnp.where(valid, srt, srt[:, :1])
  return pos.astype(jnp.int32), jnp.broadcast_to(valid, pos.shape)


def _backbone(state, tokens, orders, class_vec, m_cur, n_pred, *, graphdef, visible_pad,
              n_query, use_cfg):
  """Encoder + decoder for one AR step -> (z [B, (2,) n_query, Dd], pred_pos, pred_valid).

  The first n_pred of the n_query rows are the tokens predicted at this step (ascending
  position); the rest is padding."""
  model = nnx.merge(graphdef, state)
  seq = model.config.seq_len
  b = tokens.shape[0]
  vis_pos, vis_valid = _positions(orders, m_cur, seq - m_cur, visible_pad, seq)
  pred_pos, pred_valid = _positions(orders, m_cur - n_pred, n_pred, n_query, seq)
  vis_tok = jnp.take_along_axis(tokens, vis_pos[..., None], axis=1)
  if use_cfg:  # rows interleaved (image 0 cond, image 0 uncond, ...): stays local per device
    dup = lambda a: jnp.repeat(a, 2, axis=0)  # noqa: E731
    fake = jnp.broadcast_to(model.fake_latent[...], class_vec.shape)
    cv = jnp.stack([class_vec, fake], axis=1).reshape(2 * b, -1)
    x = model.encode(dup(vis_tok), dup(vis_pos), cv, valid=dup(vis_valid))
    z = model.decode(x, dup(vis_pos), valid=dup(vis_valid), query_positions=dup(pred_pos))
    z = z.reshape(b, 2, n_query, -1)
  else:
    x = model.encode(vis_tok, vis_pos, class_vec, valid=vis_valid)
    z = model.decode(x, vis_pos, valid=vis_valid, query_positions=pred_pos)
  return z, pred_pos, pred_valid


def head_bucket(state, z, pred_pos, pred_valid, tokens, image_keys, tables, cfg, temperature, *,
          graphdef, num_steps, n_pad, use_cfg, modulation_budget=MODULATION_BUDGET_BYTES,
          head_cache=0):
  """Samples the predicted tokens of one AR step (the first n_pad of the backbone's query
  rows) and writes them into `tokens`."""
  z, pred_pos, pred_valid = z[..., :n_pad, :], pred_pos[:, :n_pad], pred_valid[:, :n_pad]
  b = pred_pos.shape[0]
  ch = tokens.shape[2]
  noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, NOISE_STREAM))(image_keys)
  row_keys = jax.vmap(lambda k, p: jax.vmap(lambda q: jax.random.fold_in(k, q))(p))(
    noise_keys, pred_pos).reshape(b * n_pad)
  draw = lambda stream: jax.vmap(  # noqa: E731
    lambda k: jax.random.normal(jax.random.fold_in(k, stream), (ch,)))(row_keys)
  return _denoise_and_write(graphdef, state, z, pred_pos, pred_valid, tokens, tables, cfg,
                            temperature, draw(0), lambda i: draw(i + 1), num_steps, use_cfg,
                            modulation_budget, head_cache)


def head_bucket_explicit(state, z, pred_pos, pred_valid, tokens, x_init, eps, tables, cfg,
                   temperature, *, graphdef, num_steps, n_pad, use_cfg,
                   modulation_budget=MODULATION_BUDGET_BYTES, head_cache=0):
  """`head_bucket` with the initial noise x_init [B, n_pad, C] and step noise eps [A, B, n_pad, C]
  given (parity tests inject the reference implementation's noise)."""
  z, pred_pos, pred_valid = z[..., :n_pad, :], pred_pos[:, :n_pad], pred_valid[:, :n_pad]
  rows, ch = x_init.shape[0] * x_init.shape[1], x_init.shape[2]
  return _denoise_and_write(graphdef, state, z, pred_pos, pred_valid, tokens, tables, cfg,
                            temperature, x_init.reshape(rows, ch),
                            lambda i: eps[i].reshape(rows, ch), num_steps, use_cfg,
                            modulation_budget, head_cache)


def _denoise_and_write(graphdef, state, z, pred_pos, pred_valid, tokens, tables, cfg,
                       temperature, x_init, noise_at, num_steps, use_cfg, modulation_budget,
                       head_cache):
  net = nnx.merge(graphdef, state).diffloss.net
  b, n_pad = pred_pos.shape
  seq, ch = tokens.shape[1], tokens.shape[2]
  rows = b * n_pad
  if use_cfg:
    zc, zu = z[:, 0].reshape(rows, -1), z[:, 1].reshape(rows, -1)
  else:
    zc, zu = z.reshape(rows, -1), None
  x0 = p_sample_loop(net, zc, zu, x_init, tables, num_steps=num_steps, cfg=cfg,
                     temperature=temperature, noise_at=noise_at,
                     modulation_budget=modulation_budget, head_cache=head_cache)
  idx = jnp.where(pred_valid, pred_pos, seq)
  new = x0.reshape(b, n_pad, ch).astype(tokens.dtype)
  return jax.vmap(lambda t, i, v: t.at[i].set(v, mode='drop'))(tokens, idx, new)


def _head_cache(threshold_of: Callable[[int], int] | None, step) -> int:
  """Static head-cache threshold of an AR step's head call (0: off; LazyConfig.head_threshold
  of its chain length)."""
  if threshold_of is None:
    return 0
  t = int(threshold_of(step.actual_steps))
  return 0 if t <= 1 else t


def _init(state, labels, image_keys, *, graphdef, seq_len):
  model = nnx.merge(graphdef, state)
  orders = jax.vmap(lambda k: jax.random.permutation(
    jax.random.fold_in(k, ORDER_STREAM), seq_len))(image_keys).astype(jnp.int32)
  return orders, model.class_embedding(labels)


@functools.cache
def _jitted(mesh: Mesh | None):
  """(function, jit sharding kwargs) for init, backbone, head and head_explicit."""
  if mesh is None:
    donate = dict(donate_argnums=(4,))   # tokens are updated in place
    return {'init': (_init, {}), 'backbone': (_backbone, {}), 'head': (head_bucket, donate),
            'head_explicit': (head_bucket_explicit, donate)}
  rep, bat = shd.replicated(mesh), shd.batch_sharded(mesh)
  steps_bat = jax.sharding.NamedSharding(mesh, jax.P(None, bat.spec[0]))
  return {
    'init': (_init, dict(in_shardings=(rep, bat, bat), out_shardings=(bat, bat))),
    'backbone': (_backbone, dict(in_shardings=(rep, bat, bat, bat, rep, rep),
                                 out_shardings=(bat, bat, bat))),
    'head': (head_bucket, dict(in_shardings=(rep, bat, bat, bat, bat, bat, rep, rep, rep),
                         out_shardings=bat, donate_argnums=(4,))),
    'head_explicit': (head_bucket_explicit, dict(
      in_shardings=(rep, bat, bat, bat, bat, bat, steps_bat, rep, rep, rep), out_shardings=bat,
      donate_argnums=(4,))),
  }


def _timed_compile(lowered):
  t0 = time.perf_counter()
  exe = lowered.compile()
  return exe, time.perf_counter() - t0


@dataclasses.dataclass
class RunStats:
  """What one `generate` call did: compile and sampling time, per phase when timed."""

  plan: SamplingPlan
  wall_s: float = 0.0
  compile_s: float = 0.0
  backbone_s: float = 0.0
  head_s: float = 0.0
  compiles: dict = dataclasses.field(default_factory=dict)
  compile_split: dict = dataclasses.field(default_factory=dict)   # lower/xla/wait/warmup s
  cache: dict | None = None   # the backbone cache's report (lazy.LazyBackbone.report)

  def as_dict(self) -> dict:
    d = {'wall_s': round(self.wall_s, 4), 'compile_s': round(self.compile_s, 4),
         'compiles': dict(self.compiles)}
    if self.compile_split:
      d['compile_split'] = {k: round(v, 4) for k, v in self.compile_split.items()}
    if self.backbone_s or self.head_s:
      d.update(backbone_s=round(self.backbone_s, 4), head_s=round(self.head_s, 4))
    d.update(self.plan.report())
    if self.cache is not None:
      d['cache'] = self.cache
    return d


class Sampler:
  """Holds a MAR model split for jitted sampling; `generate` runs one batch.

  Every bucket is compiled ahead of time (`jit(...).lower(...).compile()`) on first use and
  kept, so compile time is measured per bucket (`compile_log`) and never counted as
  sampling time.

  Args:
    model: a `disa_jax.MAR`.
    mesh: optional mesh; the batch is sharded over its data axis, parameters replicated.
    enc_bucket: encoder lengths are padded to a multiple of this (0: seq_len / 16).
    max_head_waste: largest fraction of padded head row-steps allowed in a bucket.
    matmul_precision: None (backend default) or 'highest' for fp32-exact parity runs.
    solver: head solver, 'ddpm' (official ancestral sampler), 'ddim', 'dpmpp_2m' or
      'dpmpp_2m_sde' (`disa_jax.diffusion.ddpm`); `generate(solver=...)` overrides it per call.
    eta: DDIM's noise scale (0: deterministic DDIM).
    head_steps: 'exact' (one head executable per (steps, rows) bucket) or 'traced' (one per
      rows bucket, step count a traced loop bound over tables padded to the run's largest).
    compile_threads: compile a plan's buckets in this many threads (1: one after another).
    background_compile: `compile` (and so `generate`) returns once the buckets are lowered;
      XLA compiles them in `compile_threads` background threads while sampling starts, and
      each AR step waits only for its own executables (`last_stats.compile_split['wait']`).
    modulation_budget: bytes of adaLN modulations the head may precompute per call
      (`diffusion.ddpm.MODULATION_BUDGET_BYTES`; 0 forces the per-step path that large
      batches take; a static argument of the head executables, so part of their cache key).
    cache: backbone feature cache, None / 'none' or 'lazymar[:k=v,...]' (`lazy.py`,
      docs/caching.md); `generate(cache=...)` overrides it per call.
    warmup: run each newly compiled executable once on placeholder inputs inside `compile`
      (benchmarks that time the first batch); off, the first batch pays those one-off costs.
    trace_cache: a directory keeping each executable's trace (`engine/aot.py`), so a warm
      start skips tracing; pair it with the persistent XLA cache, which skips compiling.
  """

  def __init__(self, model, *, mesh: Mesh | None = None, enc_bucket: int = 0,
               max_head_waste: float = 0.05, matmul_precision: str | None = None,
               solver: str = 'ddpm', eta: float = 0.0, head_steps: str = 'exact',
               compile_threads: int = 1, modulation_budget: int = MODULATION_BUDGET_BYTES,
               cache=None, warmup: bool = False, trace_cache: str | None = None,
               background_compile: bool = False):
    check_solver(solver, eta)
    from disa_jax.systems.mar.lazy import parse_cache
    self.cache = parse_cache(cache)
    self.last_lazy = None   # the LazyBackbone of the last cached generate call
    if head_steps not in ('exact', 'traced'):
      raise ValueError(f'head_steps must be exact or traced, got {head_steps!r}')
    self.solver, self.eta, self.head_steps = solver, float(eta), head_steps
    self.compile_threads = max(1, int(compile_threads))
    self.modulation_budget = int(modulation_budget)
    self.config = model.config
    self.graphdef, state = nnx.split(model)
    self.mesh = mesh
    # name -> (pure function, jit kwargs) of every executable this sampler compiles; the
    # backbone cache adds its own (lazy.py).
    self.functions: dict = dict(_jitted(mesh))
    self.state = state if mesh is None else shd.put(state, shd.replicated(mesh))
    self.enc_bucket = enc_bucket or max(1, self.config.seq_len // 16)
    self.max_head_waste = max_head_waste
    self.matmul_precision = matmul_precision or None
    self._tables: dict = {}
    self._executables: dict = {}
    self.compile_log: dict = {}   # bucket key -> lower + compile seconds
    self.warmup = bool(warmup)
    self.trace_cache = trace_cache or None
    self.background_compile = bool(background_compile)
    self._pending: dict = {}   # key -> (name, lower seconds, Future of (executable, seconds))
    self._pool = None
    self._in_compile = False
    self._model_key = None
    self.trace_loads: collections.Counter = collections.Counter()   # traces read from disk
    # Seconds spent compiling, by phase: lower, xla, wait, warmup (see `compile`).
    self.phase_s: collections.Counter = collections.Counter()
    # Compilations (= traces) per function of this sampler: init, backbone, head.
    self.trace_counts: collections.Counter = collections.Counter()
    self.last_stats: RunStats | None = None

  def plan(self, batch_size: int, *, steps: Sequence[int], max_timestep: int | None,
           cfg: float, cfg_schedule: str = 'linear') -> SamplingPlan:
    return make_plan(self.config, batch_size=batch_size, steps=steps, max_timestep=max_timestep,
                     cfg=cfg, cfg_schedule=cfg_schedule, enc_bucket=self.enc_bucket,
                     max_head_waste=self.max_head_waste,
                     traced_steps=self.head_steps == 'traced')

  # ----------------------------------------------------------------------------------------
  def _precision(self):
    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def _device_tables(self, requested: int, max_timestep, steps_pad: int = 0,
                     solver: str | None = None, eta: float | None = None):
    solver = self.solver if solver is None else solver
    eta = self.eta if eta is None else float(eta)
    key = (requested, max_timestep, steps_pad, solver, eta)
    if key not in self._tables:
      tables = device_tables(requested, max_timestep, solver, eta, pad_to=steps_pad or None)
      if self.mesh is not None:
        tables = shd.put(tables, shd.replicated(self.mesh))
      self._tables[key] = tables
    return self._tables[key]

  def _batch(self, x, axis: int = 0):
    if self.mesh is None:
      return jnp.asarray(x)
    if axis == 0:
      return shd.put(x, shd.batch_sharded(self.mesh))
    spec = (None,) * axis + (shd.batch_sharded(self.mesh).spec[0],)
    return shd.put(x, jax.sharding.NamedSharding(self.mesh, jax.P(*spec)))

  def _key(self, name: str, args, static: dict):
    return (name, self.mesh, tuple(sorted(static.items(), key=lambda kv: kv[0])),
            jax.tree.structure(args),
            tuple((tuple(np.shape(a)), str(getattr(a, 'dtype', type(a))))
                  for a in jax.tree.leaves(args)))

  def _lower(self, name: str, args, static: dict):
    fn, jit_kwargs = self.functions[name]
    t0 = time.perf_counter()
    with self._precision():
      if self.trace_cache:
        if self._model_key is None:
          self._model_key = aot.model_fingerprint(self.config, self.state)
        lowered = aot.lower(name, fn, static, jit_kwargs, args, trace_dir=self.trace_cache,
                            model_key=self._model_key)
        self.trace_loads[name] += lowered.loaded
      else:
        lowered = jax.jit(functools.partial(fn, **static), **jit_kwargs).lower(*args)
    self.phase_s['lower'] += time.perf_counter() - t0
    return lowered

  def _store(self, key, name: str, exe, lower_s: float, xla_s: float) -> None:
    self.compile_log[key] = lower_s + xla_s
    self.phase_s['xla'] += xla_s
    self.trace_counts[name.removesuffix('_explicit')] += 1
    self._executables[key] = exe

  def _submit(self, jobs) -> None:
    """Lowers the (name, args, static) jobs neither compiled nor pending (tracing holds the
    GIL: here, in order) and hands their XLA compiles (or persistent-cache loads, which run
    outside the GIL) to `compile_threads` background threads; `_executable` collects them."""
    for name, args, static in jobs:
      key = self._key(name, args, static)
      if key in self._executables or key in self._pending:
        continue
      t0 = time.perf_counter()
      lowered = self._lower(name, args, static)
      self._pending[key] = (name, time.perf_counter() - t0,
                            self._compile_pool().submit(_timed_compile, lowered))

  def _compile_pool(self):
    if self._pool is None:
      from concurrent.futures import ThreadPoolExecutor

      self._pool = ThreadPoolExecutor(self.compile_threads, thread_name_prefix='disa-compile')
    return self._pool

  def _executable(self, name: str, args, static: dict):
    """The AOT-compiled executable of function `name` (of `self.functions`) for these shapes
    (arrays or `jax.ShapeDtypeStruct`s) and static arguments, compiled (jit -> lower ->
    compile) the first time, or collected from the background compile threads. Waiting for a
    background compile outside `compile` first lets the computations producing `args` finish,
    so `phase_s['wait']` holds only time in which nothing but compiling happened."""
    key = self._key(name, args, static)
    exe = self._executables.get(key)
    if exe is not None:
      return exe
    if key in self._pending:
      name, lower_s, future = self._pending.pop(key)
      if not future.done() and not self._in_compile:
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        future.result()
        self.phase_s['wait'] += time.perf_counter() - t0
      exe, xla_s = future.result()
      self._store(key, name, exe, lower_s, xla_s)
      return exe
    t0 = time.perf_counter()
    lowered = self._lower(name, args, static)
    t1 = time.perf_counter()
    exe = lowered.compile()
    self._store(key, name, exe, t1 - t0, time.perf_counter() - t1)
    return exe

  def _run(self, name: str, args, static: dict):
    return self._executable(name, args, static)(*args)

  def compile(self, plan: SamplingPlan, *, explicit_noise: bool = False,
              solver: str | None = None, eta: float | None = None,
              backbone: bool = True, block: bool | None = None,
              head_cache: Callable[[int], int] | None = None) -> float:
    """Compiles every bucket of `plan` not compiled yet; returns the wall seconds spent.

    `block` (default: not `background_compile`) waits for every executable; without it the
    buckets are lowered here and compiled in background threads while sampling starts, each
    AR step waiting only for its own executables (`phase_s['wait']`). With
    `Sampler(warmup=True)` each executable compiled here also runs once on placeholder inputs
    (one-off first-execution costs stay out of timed sampling; implies `block`); buckets
    compiled by an earlier call are neither compiled nor run again. `phase_s` accumulates the
    split: lower (trace + StableHLO, or reading the trace cache), xla (XLA compile or
    persistent-cache load, summed over threads), wait, warmup (those runs).
    """
    t_start, logged = time.perf_counter(), len(self.compile_log)
    block = (not self.background_compile) if block is None else block
    block = block or self.warmup
    b, seq, ch = plan.batch_size, self.config.seq_len, self.config.token_embed_dim
    gd, st = self.graphdef, self.state
    labels = self._batch(np.zeros((b,), np.int32))
    keys = self._batch(jax.random.split(jax.random.key(0), b))
    orders, class_vec = self._run('init', (st, labels, keys), dict(graphdef=gd,
                                                                          seq_len=seq))
    tokens = self._batch(np.zeros((b, seq, ch), np.float32))
    jobs = self._compile_jobs(plan, explicit_noise, solver, eta, tokens, orders, class_vec, keys,
                              head_cache)
    jobs = [job for job in jobs if backbone or job[0] != 'backbone']   # cached runs: lazy.py
    new = [job for job in jobs if self._key(*job) not in self._executables]
    if not new and len(self.compile_log) == logged:
      return 0.0   # nothing compiled: the placeholder init run above is not compile time
    if self.compile_threads > 1 or not block:
      self._submit(new)
    if block:
      self._in_compile = True
      try:
        for job in new:
          self._executable(*job)
      finally:
        self._in_compile = False
    if self.warmup and new:
      t0 = time.perf_counter()
      jax.block_until_ready([self._run(*job) for job in new])
      self.phase_s['warmup'] += time.perf_counter() - t0
    return time.perf_counter() - t_start

  def _compile_jobs(self, plan, explicit_noise, solver, eta, tokens, orders, class_vec, keys,
                    head_cache=None):
    """(name, placeholder args, static) of every backbone and head bucket of `plan`."""
    b, seq, ch = plan.batch_size, self.config.seq_len, self.config.token_embed_dim
    dd = self.config.decoder_embed_dim
    gd, st = self.graphdef, self.state
    branch = (2,) if plan.use_cfg else ()
    seen_b, seen_h, jobs = set(), set(), []
    for s in plan.steps:
      if s.visible_pad not in seen_b:
        seen_b.add(s.visible_pad)
        jobs.append((
          'backbone', (st, tokens, orders, class_vec, jnp.int32(s.m_cur), jnp.int32(s.n_pred)),
          dict(graphdef=gd, visible_pad=s.visible_pad, n_query=plan.n_query,
               use_cfg=plan.use_cfg)))
      hc = _head_cache(head_cache, s)
      if (s.head_key, hc) in seen_h:
        continue
      seen_h.add((s.head_key, hc))
      a_static = s.head_key[0]
      z = self._batch(np.zeros((b, *branch, plan.n_query, dd), np.float32))
      pos = self._batch(np.zeros((b, plan.n_query), np.int32))
      valid = self._batch(np.zeros((b, plan.n_query), bool))
      tables = self._device_tables(s.requested_steps, plan.max_timestep, s.steps_pad,
                                   solver, eta)
      scal = (jnp.float32(1.0), jnp.float32(1.0))
      static = dict(graphdef=gd, num_steps=a_static, n_pad=s.n_pad, use_cfg=plan.use_cfg,
                    modulation_budget=self.modulation_budget, head_cache=hc)
      tok = self._batch(np.zeros((b, seq, ch), np.float32))
      if explicit_noise:
        x0 = self._batch(np.zeros((b, s.n_pad, ch), np.float32))
        eps = self._batch(np.zeros((a_static, b, s.n_pad, ch), np.float32), axis=1)
        jobs.append(('head_explicit',
                              (st, z, pos, valid, tok, x0, eps, tables, *scal), static))
      else:
        jobs.append(('head', (st, z, pos, valid, tok, keys, tables, *scal), static))
    return jobs

  # ----------------------------------------------------------------------------------------
  def generate(
    self,
    labels,
    key,
    *,
    steps: Sequence[int],
    max_timestep: int | None = None,
    cfg: float = 1.0,
    cfg_schedule: str = 'linear',
    temperature: float = 1.0,
    image_ids=None,
    orders=None,
    noise: Callable | None = None,
    timed: bool = False,
    progress: Callable | None = None,
    on_backbone: Callable | None = None,
    solver: str | None = None,
    eta: float | None = None,
    cache=None,
  ):
    """Generates tokens [B, L, C] for `labels` [B] (ints; -1 = unconditional).

    `steps` is the requested diffusion-step count per AR step (its length is num_iter).
    `image_ids` [B] (default 0..B-1) select each image's random stream under `key`.
    `orders` [B, L] and `noise(ar_step, n) -> (x_T [B, n, C], eps [A, B, n, C])` replace the
    internal randomness (parity tests). `timed` synchronises after each phase to measure
    backbone and head time separately. `progress(step_index)` is called after each AR step.
    `on_backbone(ar_step, z, pred_pos, pred_valid)` sees each step's decoder conditions
    z [B, (2,) n_query, Dd] (cond, uncond under CFG) before the head runs (for analysis).
    Compilation happens before sampling starts and is reported as `last_stats.compile_s`.
    `solver` / `eta` override the sampler's head solver for this call; `cache` its backbone
    cache ('none' turns a sampler's cache off).
    """
    if solver is not None or eta is not None:
      check_solver(self.solver if solver is None else solver, self.eta if eta is None else eta)
    steps = [int(s) for s in steps]
    b = int(np.shape(labels)[0])
    if b % shd.data_size(self.mesh):
      raise ValueError(f'batch size {b} must be a multiple of the {shd.data_size(self.mesh)} '
                       'data-parallel devices; pad the batch')
    plan = self.plan(b, steps=steps, max_timestep=max_timestep, cfg=cfg,
                     cfg_schedule=cfg_schedule)
    gd, st = self.graphdef, self.state
    seq, ch = self.config.seq_len, self.config.token_embed_dim
    before = collections.Counter(self.trace_counts)
    phase_before = collections.Counter(self.phase_s)
    stats = RunStats(plan=plan)
    from disa_jax.systems.mar.lazy import LazyBackbone, parse_cache
    lazy_cfg = self.cache if cache is None else parse_cache(cache)
    lazy = None if lazy_cfg is None else LazyBackbone(self, plan, lazy_cfg)
    head_cache = None if lazy is None else lazy.lazy.head_threshold
    stats.compile_s = self.compile(plan, explicit_noise=noise is not None, solver=solver,
                                   eta=eta, backbone=lazy is None, block=True if timed else None,
                                   head_cache=head_cache)
    t_start = time.perf_counter()
    labels_arr = self._batch(np.asarray(labels, np.int32))
    ids = np.arange(b) if image_ids is None else np.asarray(image_ids)
    image_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids, jnp.uint32))
    image_keys = self._batch(image_keys)
    gen_orders, class_vec = self._run('init', (st, labels_arr, image_keys),
                                      dict(graphdef=gd, seq_len=seq))
    if orders is not None:
      gen_orders = self._batch(np.asarray(orders, np.int32))
    tokens = self._batch(np.zeros((b, seq, ch), np.float32))
    if lazy is not None:
      stats.compile_s += lazy.compile(tokens, gen_orders, class_vec)
      t_start = time.perf_counter()
    for s in plan.steps:
      t0 = time.perf_counter()
      if lazy is not None:
        z, pred_pos, pred_valid = lazy.step(s, tokens, gen_orders, class_vec)
      else:
        z, pred_pos, pred_valid = self._run(
          'backbone',
          (st, tokens, gen_orders, class_vec, jnp.int32(s.m_cur), jnp.int32(s.n_pred)),
          dict(graphdef=gd, visible_pad=s.visible_pad, n_query=plan.n_query,
               use_cfg=plan.use_cfg))
      if on_backbone is not None:
        on_backbone(s, z, pred_pos, pred_valid)
      if timed:
        jax.block_until_ready(z)
        t1 = time.perf_counter()
        stats.backbone_s += t1 - t0
      tables = self._device_tables(s.requested_steps, max_timestep, s.steps_pad, solver, eta)
      scalars = (jnp.float32(s.cfg), jnp.float32(temperature))
      static = dict(graphdef=gd, num_steps=s.head_key[0], n_pad=s.n_pad, use_cfg=plan.use_cfg,
                    modulation_budget=self.modulation_budget,
                    head_cache=_head_cache(head_cache, s))
      if noise is None:
        tokens = self._run('head', (st, z, pred_pos, pred_valid, tokens, image_keys,
                                          tables, *scalars), static)
      else:
        x_init, eps = self._explicit_noise(noise, s, b, ch)
        tokens = self._run('head_explicit',
                           (st, z, pred_pos, pred_valid, tokens, x_init, eps, tables,
                            *scalars), static)
      if timed:
        jax.block_until_ready(tokens)
        stats.head_s += time.perf_counter() - t1
      if progress is not None:
        progress(s.index)
    jax.block_until_ready(tokens)
    waited = self.phase_s['wait'] - phase_before['wait']   # background compiles (compile)
    stats.wall_s = time.perf_counter() - t_start - waited
    stats.compile_s += waited
    stats.compiles = {k: self.trace_counts[k] - before[k] for k in ('init', 'backbone', 'head')}
    stats.compile_split = {k: self.phase_s[k] - phase_before[k]
                           for k in ('lower', 'xla', 'wait', 'warmup')}
    if lazy is not None:
      stats.compiles.update({k: self.trace_counts[k] - before[k]
                             for k in ('lazy_refresh', 'lazy_step')})
      stats.cache = lazy.report()
    self.last_stats = stats
    self.last_lazy = lazy
    return tokens

  def _explicit_noise(self, noise, s, b, ch):
    x_t, eps = noise(s.index, s.n_pred)
    x_t = np.asarray(x_t, np.float32).reshape(b, s.n_pred, ch)
    eps = np.asarray(eps, np.float32).reshape(s.actual_steps, b, s.n_pred, ch)
    pad = s.n_pad - s.n_pred
    x_t = np.pad(x_t, ((0, 0), (0, pad), (0, 0)))
    eps = np.pad(eps, ((0, s.head_key[0] - s.actual_steps), (0, 0), (0, pad), (0, 0)))
    return self._batch(x_t), self._batch(eps, axis=1)


def generate(model, labels, key, *, num_iter: int = 64, cfg: float = 1.0,
             cfg_schedule: str = 'linear', temperature: float = 1.0, steps=100,
             max_timestep: int | None = None, mesh: Mesh | None = None, **kwargs):
  """Tokens [B, L, C] for `labels` [B] with the official MAR sampler and per-AR-step steps.

  `steps` is an int (every AR step) or a list of length `num_iter`, e.g.
  `step_schedule('linear', 64, 50, 5)` with `max_timestep=950` for DiSA.
  """
  from disa_jax.schedules import resolve_steps

  plan = resolve_steps(num_iter=num_iter, preset=None, steps=steps, max_timestep=max_timestep)
  return Sampler(model, mesh=mesh).generate(
    labels, key, steps=plan.steps, max_timestep=plan.max_timestep, cfg=cfg,
    cfg_schedule=cfg_schedule, temperature=temperature, **kwargs)
