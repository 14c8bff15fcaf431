"""Harmon text-to-image sampling with DiSA: the official MAR loop around the Qwen2 trunk.

Semantics of wusize/Harmon `Harmon.sample` (+ Harmon_DiSA's per-iteration step counts):
- the prompt rows (B conditional prompts and, under CFG, B copies of the unconditional prompt)
  are prefilled once per batch into a KV cache;
- each of the K MAR iterations runs MAR encoder -> LLM (image segment after the prompt cache,
  buffers last, positions from each row's valid prompt length) -> MAR decoder on all rows; the
  cache is never extended (the official code appends and truncates back: same computation);
- orders and masks are shared by a prompt's cond and uncond rows; the head samples the predicted
  tokens with CFG (constant 3.0 by default) and DiSA's step count T(s) (950 clamp); the sampled
  tokens are shared by both rows.

Row layout on device: image i's cond row is 2i and its uncond row 2i + 1 (the official code
stacks all cond rows, then all uncond rows; the per-row numbers are the same), so a batch shards
over the data axis without moving rows.

Static shapes (bounded compiles, reported in `last_stats`): the prompt is padded to a multiple of
`prompt_bucket`; the encoder / LLM segment to `nb + V_pad` with V_pad a multiple of `enc_bucket`
(pads after the buffers: the causal order of real tokens is unchanged and pads are hidden); the
decoder queries only the `n_query` rows around the predicted tokens; the head is MAR's
`(A, n_pad)` buckets. One plan (`disa_jax.systems.mar.plan.make_plan`, the MAR planner at the run-time
grid) lists every shape before sampling starts.

Sharding (`mesh`): the rows over every data axis of the mesh; parameters replicated, or with an
`fsdp` mesh axis (`runtime.fsdp`) split FSDP-style (`disa_jax.train.partition`: each array of
>= 16k elements along its largest dimension divisible by the axis) so a model that does not
fit one device is spread over the group, XLA gathering each weight where it is used.

Randomness is per image as in the MAR sampler: image i under key k uses fold_in(k, i); orders from
stream 0, the noise of the token at position p from stream 1 folded with p. `orders=` and
`noise=` inject the official code's draws (parity tests).
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

from disa_jax import sharding as shd
from disa_jax.diffusion.ddpm import device_tables
from disa_jax.systems.harmon.model import Harmon, at_image_size
from disa_jax.systems.mar.plan import SamplingPlan, make_plan
from disa_jax.systems.mar.sampling import head_bucket, head_bucket_explicit
from disa_jax.train.partition import state_shardings

ORDER_STREAM = 0


def _positions(orders, start, count, size: int, seq_len: int):
  """Ascending positions orders[:, start:start+count] padded to `size` -> (pos, valid)."""
  b = orders.shape[0]
  if size == 0:
    return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
  ext = jnp.concatenate([orders, orders], axis=1)
  window = jax.lax.dynamic_slice_in_dim(ext, start, size, axis=1)
  valid = jnp.arange(size) < count
  srt = jnp.sort(jnp.where(valid, window, seq_len), axis=1)
  return jnp.where(valid, srt, srt[:, :1]).astype(jnp.int32), jnp.broadcast_to(valid, srt.shape)


def _rows(x, use_cfg):
  """Per-image array -> per-LLM-row array (cond and uncond rows of image i at 2i, 2i + 1)."""
  return jnp.repeat(x, 2, axis=0) if use_cfg else x


def _gather(tokens, orders, m_cur, n_pred, *, visible_pad, n_query, use_cfg, seq_len):
  vis_pos, vis_valid = _positions(orders, m_cur, seq_len - m_cur, visible_pad, seq_len)
  pred_pos, pred_valid = _positions(orders, m_cur - n_pred, n_pred, n_query, seq_len)
  vis_tok = jnp.take_along_axis(tokens, vis_pos[..., None], axis=1)
  return (_rows(vis_tok, use_cfg), _rows(vis_pos, use_cfg), _rows(vis_valid, use_cfg),
          pred_pos, pred_valid)


def _backbone(state, tokens, orders, cache, m_cur, n_pred, *, graphdef, visible_pad, n_query,
              use_cfg):
  """Encoder + LLM + decoder of one MAR iteration -> (z [B, (2,) n_query, Dd], pred_pos,
  pred_valid), the first n_pred query rows being this iteration's tokens."""
  model = nnx.merge(graphdef, state)
  seq = model.mar.config.seq_len
  vis_tok, vis_pos, vis_valid, pred_pos, pred_valid = _gather(
    tokens, orders, m_cur, n_pred, visible_pad=visible_pad, n_query=n_query,
    use_cfg=use_cfg, seq_len=seq)
  z = model.backbone(vis_tok, vis_pos, vis_valid, seq - m_cur, cache,
                     query_pos=_rows(pred_pos, use_cfg))
  if use_cfg:
    z = z.reshape(tokens.shape[0], 2, n_query, -1)
  return z, pred_pos, pred_valid


# Timed mode: the same computation in three jitted stages (encoder / LLM / decoder).
def _stage_encoder(state, tokens, orders, m_cur, n_pred, *, graphdef, visible_pad, n_query,
                   use_cfg):
  model = nnx.merge(graphdef, state)
  mar = model.mar
  seq = mar.config.seq_len
  vis_tok, vis_pos, vis_valid, pred_pos, pred_valid = _gather(
    tokens, orders, m_cur, n_pred, visible_pad=visible_pad, n_query=n_query,
    use_cfg=use_cfg, seq_len=seq)
  fake = jnp.broadcast_to(mar.fake_latent[...], (vis_pos.shape[0], mar.fake_latent.shape[-1]))
  x_enc = mar.encode(vis_tok, vis_pos, fake, valid=vis_valid)
  return x_enc, vis_pos, vis_valid, pred_pos, pred_valid


def _stage_llm(state, x_enc, cache, m_cur, *, graphdef):
  model = nnx.merge(graphdef, state)
  nb = model.mar.config.buffer_size
  v = model.mar.config.seq_len - m_cur
  r, n = x_enc.shape[:2]
  from disa_jax.systems.harmon.model import _apply

  u = _apply(model.proj_in, x_enc)
  j = jnp.arange(n)
  seg = u[:, jnp.where(j < v, nb + j, jnp.where(j < v + nb, j - v, j))]
  positions = jnp.sum(cache.valid, axis=1).astype(jnp.int32)[:, None] + j[None]
  h = model.llm.model(seg, positions, cache=cache, key_valid=jnp.broadcast_to(j < v + nb, (r, n)))
  h = h[:, jnp.where(j < nb, v + j, jnp.where(j < nb + v, j - nb, j))]
  return x_enc + _apply(model.proj_out, h).astype(x_enc.dtype)


def _stage_decoder(state, x_dec, vis_pos, vis_valid, pred_pos, *, graphdef, use_cfg):
  model = nnx.merge(graphdef, state)
  z = model.mar.decode(x_dec, vis_pos, valid=vis_valid, query_positions=_rows(pred_pos, use_cfg))
  if use_cfg:
    z = z.reshape(pred_pos.shape[0], 2, pred_pos.shape[1], -1)
  return z


def _prefill(state, ids, valid, *, graphdef):
  return nnx.merge(graphdef, state).prefill(ids, valid)


def _init(image_keys, *, seq_len):
  return jax.vmap(lambda k: jax.random.permutation(
    jax.random.fold_in(k, ORDER_STREAM), seq_len))(image_keys).astype(jnp.int32)


_FUNCS = {'backbone': _backbone, 'encoder': _stage_encoder, 'llm': _stage_llm,
          'decoder': _stage_decoder, 'prefill': _prefill, 'init': _init, 'head': head_bucket,
          'head_explicit': head_bucket_explicit}


@dataclasses.dataclass
class HarmonRunStats:
  """What one `generate` call did: compile / sampling seconds, the phase split when timed,
  compiles per function and the plan's padding report."""

  plan: SamplingPlan
  prompt_len: int = 0
  prompt_pad: int = 0
  wall_s: float = 0.0
  compile_s: float = 0.0
  phase_s: dict = dataclasses.field(default_factory=dict)
  compiles: dict = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    d = {'wall_s': round(self.wall_s, 4), 'compile_s': round(self.compile_s, 4),
         'compiles': dict(self.compiles), 'prompt_len': self.prompt_len,
         'prompt_pad': self.prompt_pad}
    if self.phase_s:
      d['phase_s'] = {k: round(v, 4) for k, v in self.phase_s.items()}
    d.update(self.plan.report())
    return d


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int = 0,
                min_len: int = 0):
  """Right-padded ids [R, Lp] (Lp = max(longest, min_len) rounded up to `bucket`) and
  validity [R, Lp]."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  longest = max(len(p) for p in prompts)
  lp = -(-max(longest, min_len) // bucket) * bucket
  ids = np.full((len(prompts), lp), pad_id, np.int32)
  valid = np.zeros((len(prompts), lp), bool)
  for r, p in enumerate(prompts):
    ids[r, :len(p)] = np.asarray(p, np.int32)
    valid[r, :len(p)] = True
  return ids, valid, longest


class HarmonSampler:
  """A Harmon model split for jitted sampling; `generate` runs one batch of prompts.

  Args:
    model: a `Harmon` (checkpoint shapes; resized to `image_size` here) or a run-time one.
    image_size: run-time image size (default: the config's, 512).
    enc_bucket: encoder / LLM segment padding multiple (0: seq_len / 16, i.e. 64 at 512 px).
    prompt_bucket: prompt length padding multiple.
    max_head_waste: largest fraction of padded head row-steps per bucket.
    matmul_precision: None or 'highest' (fp32-exact parity runs).
  """

  def __init__(self, model: Harmon, *, image_size: int | None = None, enc_bucket: int = 0,
               prompt_bucket: int = 16, max_head_waste: float = 0.05,
               matmul_precision: str | None = None, mesh=None):
    if model.mar.config.img_size == model.config.mar.img_size:      # checkpoint shapes
      model = at_image_size(model, image_size)
    elif image_size and image_size != model.mar.config.img_size:
      raise ValueError(f'model is already resized to {model.mar.config.img_size} px; pass the '
                       f'checkpoint-shaped model to sample at {image_size} px')
    self.model = model
    self.mesh = mesh
    self.config = model.config
    self.mar_config = model.mar.config
    self.graphdef, self.state = nnx.split(model)
    self.mar_graphdef, _ = nnx.split(model.mar)
    if mesh is not None and shd.FSDP in mesh.axis_names:
      self.state = jax.tree.map(shd.put, self.state, state_shardings(self.state, mesh))
    self.mar_state = self.state['mar']          # the same arrays (one copy, sharded or not)
    self.enc_bucket = enc_bucket or max(1, self.mar_config.seq_len // 16)
    self.prompt_bucket = prompt_bucket
    self.max_head_waste = max_head_waste
    self.matmul_precision = matmul_precision
    self._tables: dict = {}
    self._executables: dict = {}
    self.compile_log: dict = {}
    self.last_stats: HarmonRunStats | None = None

  def plan(self, batch_size: int, *, steps: Sequence[int], max_timestep: int | None,
           cfg: float, cfg_schedule: str = 'constant') -> SamplingPlan:
    return make_plan(self.mar_config, batch_size=batch_size, steps=steps,
                     max_timestep=max_timestep, cfg=cfg, cfg_schedule=cfg_schedule,
                     enc_bucket=self.enc_bucket, max_head_waste=self.max_head_waste)

  def compile(self, plan: SamplingPlan, *, prompt_len: int, timed: bool = False) -> float:
    """Compiles every executable `plan` needs with prompt rows padded to `prompt_len`
    (prefill, backbone buckets, head buckets); returns the seconds spent compiling."""
    before = sum(self.compile_log.values())
    rows = 2 * plan.batch_size if plan.use_cfg else plan.batch_size
    lp = -(-prompt_len // self.prompt_bucket) * self.prompt_bucket
    self._compile(plan, plan.batch_size, (rows, lp), explicit_noise=False, timed=timed)
    return sum(self.compile_log.values()) - before

  def _precision(self):
    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def _run(self, name: str, args, static: dict):
    """Calls the AOT-compiled executable of `name` for these shapes (compiling if new)."""
    exe = self._lower(name, args, static)
    if self.mesh is not None:   # each argument where the executable expects it (no-op if so)
      args = jax.device_put(args, exe.input_shardings[0])
    return exe(*args)

  def _spec(self, ndim: int, axis: int = 0):
    """The sharding of an array whose dimension `axis` is the batch (rows), or None."""
    if self.mesh is None:
      return None
    spec = [None] * ndim
    spec[axis] = shd.batch_sharded(self.mesh).spec[0]
    return jax.sharding.NamedSharding(self.mesh, jax.P(*spec))

  def _sds(self, shape, dtype, axis: int = 0):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=self._spec(len(shape), axis))

  def _put(self, x, axis: int = 0):
    x = jnp.asarray(x)
    sharding = self._spec(x.ndim, axis)
    return x if sharding is None else jax.device_put(x, sharding)

  def _device_tables(self, requested: int, max_timestep):
    key = (requested, max_timestep)
    if key not in self._tables:
      self._tables[key] = device_tables(requested, max_timestep)
    return self._tables[key]

  # ---------------------------------------------------------------------------------------
  def generate(self, prompt_ids: Sequence[Sequence[int]], key, *,
               uncond_ids: Sequence[int] | None = None, steps: Sequence[int],
               max_timestep: int | None = None, cfg: float = 3.0,
               cfg_schedule: str = 'constant', temperature: float = 1.0, orders=None,
               noise: Callable | None = None, timed: bool = False, image_ids=None,
               progress: Callable | None = None, prompt_len: int = 0):
    """Token latents [B, L, C] for B tokenised prompts (cond ids, each a list of ints).

    uncond_ids: the tokenised unconditional prompt (required when cfg != 1). steps: requested
    diffusion steps per MAR iteration (len = K). orders [B, L] and noise(iter, n) ->
    (x_T [B, n, C], eps [A, B, n, C]) replace the internal randomness. timed: run the encoder,
    LLM, decoder and head as separately synchronised stages and report their seconds.
    image_ids [B] (default 0..B-1) select each image's random stream under `key` (so an image
    does not depend on the batch it is in). progress(iteration) is called after each MAR
    iteration. prompt_len: pad the prompt rows to at least this length (one prefill shape for
    every batch of a run).
    """
    steps = [int(s) for s in steps]
    b = len(prompt_ids)
    use_cfg = cfg != 1.0
    if use_cfg and not uncond_ids:
      raise ValueError('cfg != 1 needs the unconditional prompt ids (uncond_ids)')
    rows = [r for p in prompt_ids for r in ((p, uncond_ids) if use_cfg else (p,))]
    ids, valid, longest = pad_prompts(rows, self.prompt_bucket, min_len=prompt_len)
    plan = self.plan(b, steps=steps, max_timestep=max_timestep, cfg=cfg,
                     cfg_schedule=cfg_schedule)
    stats = HarmonRunStats(plan=plan, prompt_len=ids.shape[1],
                           prompt_pad=int(ids.size - valid.sum()))
    keys_before = set(self.compile_log)
    compile_before = sum(self.compile_log.values())
    seq, ch = self.mar_config.seq_len, self.mar_config.token_embed_dim
    gd, st = self.graphdef, self.state
    phase = collections.defaultdict(float)

    def sync(name, t0, out):
      if timed:
        jax.block_until_ready(out)
        phase[name] += time.perf_counter() - t0
      return out

    # Compile every bucket first (excluded from the sampling time).
    self._compile(plan, b, ids.shape, explicit_noise=noise is not None, timed=timed)
    stats.compile_s = sum(self.compile_log.values()) - compile_before

    t_start = time.perf_counter()
    image_ids = np.arange(b) if image_ids is None else np.asarray(image_ids)
    image_keys = self._put(jax.vmap(jax.random.fold_in, (None, 0))(
      key, jnp.asarray(image_ids, jnp.uint32)))
    gen_orders = self._run('init', (image_keys,), dict(seq_len=seq))
    if orders is not None:
      gen_orders = self._put(np.asarray(orders, np.int32))
    t0 = time.perf_counter()
    cache = sync('llm', t0, self._run('prefill', (st, self._put(ids), self._put(valid)),
                                      dict(graphdef=gd)))
    tokens = self._put(np.zeros((b, seq, ch), np.float32))
    for s in plan.steps:
      args = (tokens, gen_orders)
      scal = (jnp.int32(s.m_cur), jnp.int32(s.n_pred))
      shape = dict(visible_pad=s.visible_pad, n_query=plan.n_query, use_cfg=use_cfg)
      if timed:
        t0 = time.perf_counter()
        x_enc, vis_pos, vis_valid, pred_pos, pred_valid = sync(
          'encoder', t0, self._run('encoder', (st, *args, *scal), dict(graphdef=gd, **shape)))
        t0 = time.perf_counter()
        x_dec = sync('llm', t0, self._run('llm', (st, x_enc, cache, scal[0]),
                                          dict(graphdef=gd)))
        t0 = time.perf_counter()
        z = sync('decoder', t0, self._run(
          'decoder', (st, x_dec, vis_pos, vis_valid, pred_pos),
          dict(graphdef=gd, use_cfg=use_cfg)))
      else:
        z, pred_pos, pred_valid = self._run('backbone', (st, *args, cache, *scal),
                                            dict(graphdef=gd, **shape))
      t0 = time.perf_counter()
      tables = self._device_tables(s.requested_steps, max_timestep)
      hs = (jnp.float32(s.cfg), jnp.float32(temperature))
      hstatic = dict(graphdef=self.mar_graphdef, num_steps=s.actual_steps, n_pad=s.n_pad,
                     use_cfg=use_cfg)
      if noise is None:
        tokens = self._run('head', (self.mar_state, z, pred_pos, pred_valid, tokens,
                                    image_keys, tables, *hs), hstatic)
      else:
        x_init, eps = _explicit_noise(noise, s, b, ch)
        tokens = self._run('head_explicit', (self.mar_state, z, pred_pos, pred_valid, tokens,
                                             x_init, eps, tables, *hs), hstatic)
      sync('head', t0, tokens)
      if progress is not None:
        progress(s.index)
    jax.block_until_ready(tokens)
    stats.wall_s = time.perf_counter() - t_start
    stats.phase_s = dict(phase)
    stats.compiles = dict(collections.Counter(k[0] for k in self.compile_log
                                              if k not in keys_before))
    self.last_stats = stats
    return tokens

  def _compile(self, plan, b, ids_shape, *, explicit_noise, timed):
    """Compiles (lower + compile, no run) every function / bucket `plan` needs."""
    seq, ch = self.mar_config.seq_len, self.mar_config.token_embed_dim
    gd, st = self.graphdef, self.state
    use_cfg = plan.use_cfg
    sds = self._sds
    rows = 2 * b if use_cfg else b
    k = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=self._spec(1))
    self._lower('init', (keys,), dict(seq_len=seq))
    ids = sds(ids_shape, jnp.int32)
    cache = jax.eval_shape(
      functools.partial(_prefill, graphdef=gd), st, ids, sds(ids_shape, jnp.bool_))
    cache = dataclasses.replace(cache, keys=sds(cache.keys.shape, cache.keys.dtype, axis=1),
                                values=sds(cache.values.shape, cache.values.dtype, axis=1),
                                valid=sds(cache.valid.shape, cache.valid.dtype))
    self._lower('prefill', (st, ids, sds(ids_shape, jnp.bool_)), dict(graphdef=gd))
    tokens = sds((b, seq, ch), jnp.float32)
    orders = sds((b, seq), jnp.int32)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    dd = self.mar_config.decoder_embed_dim
    d = self.mar_config.encoder_embed_dim
    for vpad in plan.backbone_buckets:
      shape = dict(visible_pad=vpad, n_query=plan.n_query, use_cfg=use_cfg)
      if timed:
        self._lower('encoder', (st, tokens, orders, i32, i32), dict(graphdef=gd, **shape))
        nb = self.mar_config.buffer_size
        x_enc = sds((rows, nb + vpad, d), jnp.float32)
        self._lower('llm', (st, x_enc, cache, i32), dict(graphdef=gd))
        pos = sds((rows, vpad), jnp.int32)
        self._lower('decoder', (st, x_enc, pos, sds((rows, vpad), jnp.bool_),
                                sds((b, plan.n_query), jnp.int32)),
                    dict(graphdef=gd, use_cfg=use_cfg))
      else:
        self._lower('backbone', (st, tokens, orders, cache, i32, i32), dict(graphdef=gd, **shape))
    branch = (2,) if use_cfg else ()
    z = sds((b, *branch, plan.n_query, dd), jnp.float32)
    pos = sds((b, plan.n_query), jnp.int32)
    val = sds((b, plan.n_query), jnp.bool_)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    for a, n_pad in plan.head_buckets:
      req = next(s.requested_steps for s in plan.steps if s.actual_steps == a)
      tables = self._device_tables(req, plan.max_timestep)
      static = dict(graphdef=self.mar_graphdef, num_steps=a, n_pad=n_pad, use_cfg=use_cfg)
      if explicit_noise:
        self._lower('head_explicit', (self.mar_state, z, pos, val, tokens,
                                      sds((b, n_pad, ch), jnp.float32),
                                      sds((a, b, n_pad, ch), jnp.float32, axis=1), tables,
                                      f32, f32),
                    static)
      else:
        self._lower('head', (self.mar_state, z, pos, val, tokens, keys, tables, f32, f32),
                    static)

  def _lower(self, name, args, static):
    key = (name, tuple(sorted(static.items(), key=lambda kv: kv[0])),
           tuple((tuple(np.shape(a)), str(getattr(a, 'dtype', type(a))))
                 for a in jax.tree.leaves(args)))
    if key not in self._executables:
      t0 = time.perf_counter()
      with self._precision():
        exe = jax.jit(functools.partial(_FUNCS[name], **static)).lower(*args).compile()
      self.compile_log[key] = time.perf_counter() - t0
      self._executables[key] = exe
    return self._executables[key]


def _explicit_noise(noise, s, b, ch):
  x_t, eps = noise(s.index, s.n_pred)
  x_t = np.asarray(x_t, np.float32).reshape(b, s.n_pred, ch)
  eps = np.asarray(eps, np.float32).reshape(s.actual_steps, b, s.n_pred, ch)
  pad = s.n_pad - s.n_pred
  x_t = np.pad(x_t, ((0, 0), (0, pad), (0, 0)))
  eps = np.pad(eps, ((0, 0), (0, 0), (0, pad), (0, 0)))
  return jnp.asarray(x_t), jnp.asarray(eps)
