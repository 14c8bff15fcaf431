"""D-AR generation: GPT next-token sampling with CFG, then the tokenizer's flow decode, with
streaming previews and layout prefixes.

Matches autoregressive/models/generate.py (+ vq_model.decode_code) of showlab/D-AR @ 3fb0f2d.

Per image token j = 0..L-1 (L = 256):
  l   = l_u + s_j (l_c - l_u)            float32 logits of rows b (class) and b + B (null class)
  s_j = linspace(a, b, L)[j]             cfg "a,b" (float32); a single number: constant
  l  /= max(T, 1e-5); top-k (keep >= k-th largest); top-p (HF nucleus: keep the smallest
        sorted prefix whose mass exceeds p, at least one); p = softmax(l)
  id  = min{i : cdf_i >= u * cdf_V}, u ~ U[0, 1)    (inverse-CDF categorical; u injectable)
The sampled id feeds both CFG rows. Prefill runs [class ; prefix] (positions 0..P) in one
pass; every later token is one jitted `step` at a traced position (one compile in all).

Decode state (`DecodeStream`, one per batch): x (B, H, W, 3) flow state started from the
noise, v_prev, step index. After group g completes, one NFE advances x and yields
preview_g = (x + (1 - t'_g) d_g) / 0.6, which equals the official decode_code(clip_steps=g+1)
with the same noise; preview_{G-1} is the final image.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.tokenizer import FlowGrid, Tokenizer, ab2_update, flow_grid


# ----------------------------------------------------------------------------------- settings
def parse_cfg(cfg) -> tuple[float, float]:
  """'a,b' | 'a' | number -> (start, end) as generate.py (a = 1.0 < b is bumped to 1.001)."""
  if isinstance(cfg, int | float):
    return float(cfg), float(cfg)
  try:
    parts = [float(p) for p in str(cfg).split(',')]
  except ValueError:
    raise UserError(f'cfg must be a number or "start,end", got {cfg!r}') from None
  if not 1 <= len(parts) <= 2:
    raise UserError(f'cfg must be a number or "start,end", got {cfg!r}')
  a, b = parts[0], parts[-1]
  if max(a, b) > 1.0 and a == 1.0:
    a += 1e-3
  return a, b


def cfg_schedule(cfg, length: int) -> tuple[np.ndarray, bool]:
  """(s_j for j < length as float32 torch.linspace would give them, whether CFG is on)."""
  a, b = parse_cfg(cfg)
  on = a > 1.0
  if on != (b > 1.0) or (on and min(a, b) <= 1.0):
    raise UserError(f'cfg {cfg!r}: the official loop needs every scale > 1 (CFG on) or the '
                    'start <= 1 (CFG off); use e.g. "1.2,8.0"')
  if length == 1:
    return np.asarray([a], np.float32), on
  # torch.linspace on float32 (ATen RangeFactories, vectorised with fused multiply-add):
  # step = (end - start) / (L - 1) in float32; fma(step, j, start) for the first half,
  # fma(-step, L - 1 - j, end) for the second.
  a32, b32 = np.float32(a), np.float32(b)
  step = np.float64((b32 - a32) / np.float32(length - 1))
  j = np.arange(length, dtype=np.float64)
  vals = np.where(j < length // 2, step * j + np.float64(a32),
                  -step * (length - 1 - j) + np.float64(b32))
  return vals.astype(np.float32), on


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  cfg: str = '1.2,8.0'
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


def filter_logits(logits, top_k: int, top_p: float):
  """HF top-k / top-p filtering (generate.py top_k_top_p_filtering) on (B, V) float32."""
  if top_k > 0:
    k = min(top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum > top_p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    remove_orig = jnp.zeros_like(remove).at[
      jnp.arange(logits.shape[0])[:, None], order].set(remove)
    logits = jnp.where(remove_orig, -jnp.inf, logits)
  return logits


def sample_from_logits(logits, uniforms, temperature: float, top_k: int, top_p: float):
  """(ids (B,) int32, probabilities (B, V)) by inverse-CDF with uniforms (B,) in [0, 1)."""
  logits = logits / max(temperature, 1e-5)
  if top_k > 0 or top_p < 1.0:
    logits = filter_logits(logits, top_k, top_p)
  probs = jax.nn.softmax(logits, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  target = uniforms[:, None].astype(jnp.float32) * cdf[:, -1:]
  ids = jnp.sum(cdf < target, axis=-1)
  return jnp.minimum(ids, logits.shape[-1] - 1).astype(jnp.int32), probs


def guide(logits, scale, on: bool, batch: int):
  if not on:
    return logits
  cond, uncond = logits[:batch], logits[batch:]
  return uncond + (cond - uncond) * scale


# ------------------------------------------------------------------------------ decode stream
class DecodeStream:
  """Incremental flow decode: call `advance(cond_group)` once per completed group."""

  def __init__(self, runner: TokenizerRunner, noise, grid: FlowGrid):
    self.runner, self.grid = runner, grid
    self.x = jnp.asarray(noise, jnp.float32)
    self.v_prev = jnp.zeros_like(self.x)
    self.step = 0

  @property
  def done(self) -> bool:
    return self.step >= len(self.grid.steps)

  def advance(self, cond_group):
    """One NFE on the group's conditions (B, Q, width) -> preview image (B, H, W, 3)."""
    if self.done:
      raise UserError('the decode stream has already taken all its steps')
    i = self.step
    self.x, self.v_prev, preview = self.runner._step(
      self.runner.state, self.x, self.v_prev, cond_group, self.grid.times[i],
      self.grid.steps[i], i == 0)
    self.step += 1
    return preview


class TokenizerRunner:
  """Jitted tokenizer functions over a split `Tokenizer` (compiled once per input shape).

  `compiles` counts traces per function (a trace is a compile: the jit cache is keyed by shape).
  """

  def __init__(self, tokenizer: Tokenizer, *, matmul_precision: str | None = None):
    self.cfg = tokenizer.cfg
    self.graphdef, self.state = nnx.split(tokenizer)
    self.matmul_precision = matmul_precision or None
    self.compiles = collections.Counter()
    count = self.compiles

    def encode(state, images):
      count['encode'] += 1
      return nnx.merge(self.graphdef, state).encode(images)

    def conditions(state, ids):
      count['conditions'] += 1
      return nnx.merge(self.graphdef, state).conditions(ids)

    def step(state, x, v_prev, cond, t, h, first):
      count['step'] += 1
      net = nnx.merge(self.graphdef, state)
      v = net.velocity(x, jnp.full((x.shape[0],), t, jnp.float32), cond)
      x_new, preview = ab2_update(x, v, v_prev, h, t, first, self.cfg.data_std)
      return x_new, v, preview

    def decode_loop(state, x, conds, times, steps):
      count['decode'] += 1
      net = nnx.merge(self.graphdef, state)

      def body(i, carry):
        x, v_prev = carry
        v = net.velocity(x, jnp.full((x.shape[0],), times[i], jnp.float32), conds[i])
        x_new, _ = ab2_update(x, v, v_prev, steps[i], times[i], i == 0, self.cfg.data_std)
        return x_new, v

      x, _ = jax.lax.fori_loop(0, conds.shape[0], body, (x, jnp.zeros_like(x)))
      return x * (1.0 / self.cfg.data_std)

    self._encode = self._wrap(jax.jit(encode))
    self._conditions = self._wrap(jax.jit(conditions))
    self._step = self._wrap(jax.jit(step))
    self._decode_loop = self._wrap(jax.jit(decode_loop))

  def _wrap(self, fn):
    def call(*args):
      with self.precision():
        return fn(*args)
    return call

  def precision(self):
    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def encode(self, images) -> np.ndarray:
    """images (B, H, W, 3) in [-1, 1] -> ids (B, N) int32."""
    images = jnp.asarray(images, jnp.float32)
    s = self.cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise UserError(f'encode expects images of shape (B, {s}, {s}, 3) in [-1, 1], '
                      f'got {tuple(images.shape)}')
    return np.asarray(self._encode(self.state, images))

  def conditions(self, ids):
    ids = self._check_ids(ids)
    return self._conditions(self.state, ids)

  def _check_ids(self, ids):
    ids = jnp.asarray(ids, jnp.int32)
    n, v = self.cfg.num_queries, self.cfg.codebook_size
    if ids.ndim != 2 or ids.shape[1] != n:
      raise UserError(f'expected ids of shape (B, {n}), got {tuple(ids.shape)}; pad a prefix '
                      'with any ids (the token decoder is causal)')
    if int(ids.min()) < 0 or int(ids.max()) >= v:
      raise UserError(f'ids must lie in [0, {v}), got [{int(ids.min())}, {int(ids.max())}]')
    return ids

  def noise(self, key, batch: int):
    s = self.cfg.image_size
    return jax.random.normal(key, (batch, s, s, 3), jnp.float32)

  def decode(self, ids, noise, *, num_steps: int | None = None,
             clip_steps: int | None = None) -> np.ndarray:
    """ids (B, N) + unit Gaussian noise (B, H, W, 3) -> images (B, H, W, 3) in about [-1, 1]
    (official decode_code; `clip_steps` k = the preview after k steps)."""
    ids = self._check_ids(ids)
    noise = self._check_noise(noise, ids.shape[0])
    grid = flow_grid(self.cfg, num_steps=num_steps, clip_steps=clip_steps)
    cond = self._conditions(self.state, ids)
    q = self.cfg.queries_per_group
    conds = jnp.stack([cond[:, g:g + q] for g in grid.group_start])
    return np.asarray(self._decode_loop(self.state, noise, conds, jnp.asarray(grid.times),
                                        jnp.asarray(grid.steps)))

  def _check_noise(self, noise, batch):
    noise = jnp.asarray(noise, jnp.float32)
    s = self.cfg.image_size
    if noise.shape != (batch, s, s, 3):
      raise UserError(f'noise must have shape ({batch}, {s}, {s}, 3), got {tuple(noise.shape)}')
    return noise

  def stream(self, noise, *, num_steps: int | None = None) -> DecodeStream:
    grid = flow_grid(self.cfg, num_steps=num_steps)
    return DecodeStream(self, self._check_noise(noise, noise.shape[0]), grid)


# ------------------------------------------------------------------------------------ sampler
@dataclasses.dataclass
class Generation:
  """Result of `Sampler.generate`: ids (B, L) int32, images (B, H, W, 3) or None, previews
  (G, B, H, W, 3) or None, wall-clock seconds per phase, ids sampled per image."""
  ids: np.ndarray
  images: np.ndarray | None = None
  previews: np.ndarray | None = None
  seconds: dict = dataclasses.field(default_factory=dict)
  num_ids: int = 0           # ids sampled per image (prefix included; < L after an early stop)
  speculation: dict | None = None   # speculative decoding's acceptance (`speculative.py`)


class Sampler:
  """GPT sampling with a static KV cache; `compiles` counts traces ('prefill' once per prefix
  length, 'step' once per batch size and sampling setting)."""

  def __init__(self, gpt, tokenizer: TokenizerRunner | None = None, *,
               matmul_precision: str | None = None):
    self.gpt_cfg = gpt.cfg
    self.tokenizer = tokenizer
    self.graphdef, self.state = nnx.split(gpt)
    self.matmul_precision = matmul_precision or None
    self.compiles = collections.Counter()
    count, graphdef = self.compiles, self.graphdef

    def prefill(state, labels, prefix, cache, scale, uniforms, on, batch, temperature, top_k,
                top_p):
      count['prefill'] += 1
      model = nnx.merge(graphdef, state)
      logits, cache = model.forward(model.embed(labels, prefix), 0, cache)
      logits = guide(logits[:, -1], scale, on, batch)
      ids, _ = sample_from_logits(logits, uniforms, temperature, top_k, top_p)
      return ids, cache

    def step(state, ids, pos, cache, scale, uniforms, on, batch, temperature, top_k, top_p):
      count['step'] += 1
      model = nnx.merge(graphdef, state)
      rows = jnp.concatenate([ids, ids]) if on else ids
      logits, cache = model.forward(model.embed_tokens(rows)[:, None], pos, cache)
      logits = guide(logits[:, -1], scale, on, batch)
      new, _ = sample_from_logits(logits, uniforms, temperature, top_k, top_p)
      return new, cache

    static = ('on', 'batch', 'temperature', 'top_k', 'top_p')
    self._prefill = jax.jit(prefill, static_argnames=static, donate_argnames=('cache',))
    self._step = jax.jit(step, static_argnames=static, donate_argnames=('cache',))

    def logits_fn(state, labels, ids):
      count['logits'] += 1
      return nnx.merge(graphdef, state)(labels, ids)

    self._logits = jax.jit(logits_fn)

  def precision(self):
    if self.matmul_precision:
      return jax.default_matmul_precision(self.matmul_precision)
    return contextlib.nullcontext()

  def logits(self, labels, ids):
    """Teacher-forced logits (B, 1 + P, V) without a cache (for tests and scoring)."""
    with self.precision():
      return np.asarray(self._logits(self.state, jnp.asarray(labels, jnp.int32),
                                     jnp.asarray(ids, jnp.int32)))

  def generate(self, labels, *, key=None, options: SamplingOptions = SamplingOptions(),
               uniforms=None, prefix_ids=None, decode: bool = True, noise=None,
               previews: bool = False, on_group=None, num_tokens: int | None = None,
               decoder_steps: int | None = None) -> Generation:
    """Samples L ids per label (and decodes them).

    labels (B,) class ids; key: jax key for the draws not given; uniforms (B, L) in [0, 1)
    replaces the categorical draws (parity tests); prefix_ids (B, P) or (P,) fixes the first P
    ids (layout control; P may be any length < L, usually a multiple of 32); noise
    (B, H, W, 3) the decoder's unit Gaussian start (drawn from `key` if None); previews: keep
    the image after every group; on_group(g, ids_so_far, preview_or_None) is called as each
    group completes (with decode, the decoder advances one step per group while sampling).
    num_tokens: stop after this many ids (early stop; `images` is then the preview of the last
    completed group, the unsampled ids stay 0).
    decoder_steps: a coarser decoder grid (S < G steps of the official `num_steps=S` decode);
    step i advances when the group it reads completes, and the GPT stops after the last group
    any step reads (previews: one per decoder step). Default: the official G-step grid.
    """
    cfg = self.gpt_cfg
    labels = self.checked_labels(labels, options)
    b, L = labels.shape[0], cfg.block_size
    key = jax.random.key(0) if key is None else key
    k_u, k_noise = jax.random.split(key)
    if uniforms is None:
      uniforms = jax.random.uniform(k_u, (b, L), jnp.float32)
    uniforms = np.asarray(uniforms, np.float32)
    if uniforms.shape != (b, L):
      raise UserError(f'uniforms must have shape ({b}, {L}), got {uniforms.shape}')
    prefix = self._prefix(prefix_ids, b)
    p = prefix.shape[1]
    tok = self.tokenizer
    want_decode = decode and tok is not None
    q = tok.cfg.queries_per_group if tok is not None else 32
    step_groups = list(range(L // q))
    if decoder_steps is not None:
      if tok is None or not 1 <= decoder_steps <= tok.cfg.num_groups:
        g_max = tok.cfg.num_groups if tok is not None else L // q
        raise UserError(f'decoder_steps must be in 1..{g_max} (one group per step at most), '
                        f'got {decoder_steps}')
      step_groups = [s // q for s in flow_grid(tok.cfg, num_steps=decoder_steps).group_start]
      if num_tokens is None:
        num_tokens = max(p + 1, (step_groups[-1] + 1) * q)
    n_total = L if num_tokens is None else int(num_tokens)
    if not p < n_total <= L:
      raise UserError(f'num_tokens must be in {p + 1}..{L} (after a {p}-id prefix), got '
                      f'{num_tokens}')
    scales, on = cfg_schedule(options.cfg, L)
    stat = dict(on=on, batch=b, temperature=float(options.temperature),
                top_k=int(options.top_k), top_p=float(options.top_p))
    rows = 2 * b if on else b
    if want_decode:
      if tok.cfg.num_queries != L or tok.cfg.codebook_size != cfg.vocab_size:
        raise UserError('tokenizer and GPT disagree on the sequence length or vocabulary')
      if noise is None:
        noise = tok.noise(k_noise, b)
      stream = tok.stream(noise, num_steps=decoder_steps)
      if len(stream.grid.steps) > tok.cfg.num_groups:
        raise UserError('streaming decode needs at most one decoder step per group')
    seq = np.zeros((b, L), np.int32)
    seq[:, :p] = prefix
    groups_out, t_gpt, t_dec = [], 0.0, 0.0
    done_groups = 0

    def finish_groups(n_ids):
      nonlocal done_groups, t_dec
      while done_groups < L // q and (done_groups + 1) * q <= n_ids:
        g = done_groups
        preview = None
        if want_decode and g in step_groups:
          t0 = time.perf_counter()
          with tok.precision():
            cond = tok._conditions(tok.state, jnp.asarray(seq))
            preview = stream.advance(cond[:, g * q:(g + 1) * q])
          if previews or on_group is not None:
            preview = np.asarray(preview)
          else:
            preview.block_until_ready()
          t_dec += time.perf_counter() - t0
          if previews:
            groups_out.append(preview)
          last_preview[0] = preview
        if on_group is not None:
          on_group(g, seq[:, :(g + 1) * q].copy(), preview)
        done_groups += 1

    last_preview = [None]
    with self.precision():
      t0 = time.perf_counter()
      cache = self.gpt_empty_cache(rows)
      lab = np.concatenate([labels, np.full((b,), cfg.num_classes, np.int32)]) if on else labels
      pre = np.concatenate([prefix, prefix]) if on else prefix
      ids, cache = self._prefill(self.state, jnp.asarray(lab), jnp.asarray(pre), cache,
                                 jnp.float32(scales[p]), jnp.asarray(uniforms[:, p]), **stat)
      seq[:, p] = np.asarray(ids)
      t_gpt += time.perf_counter() - t0
      finish_groups(p + 1)
      for j in range(p + 1, n_total):
        t0 = time.perf_counter()
        ids, cache = self._step(self.state, ids, jnp.int32(j), cache, jnp.float32(scales[j]),
                                jnp.asarray(uniforms[:, j]), **stat)
        seq[:, j] = np.asarray(ids)
        t_gpt += time.perf_counter() - t0
        finish_groups(j + 1)
    out = Generation(ids=seq, seconds={'gpt': t_gpt, 'decoder': t_dec}, num_ids=n_total)
    if want_decode:
      out.images = None if last_preview[0] is None else np.asarray(last_preview[0])
      if previews:
        out.previews = np.stack(groups_out)
    return out

  def checked_labels(self, labels, options: SamplingOptions) -> np.ndarray:
    """labels as int32 (B,), after checking them and the sampling filters (UserError)."""
    cfg = self.gpt_cfg
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
      raise UserError(f'class labels must lie in [0, {cfg.num_classes}), got '
                      f'[{labels.min()}, {labels.max()}]')
    if options.top_k < 0 or not 0.0 < options.top_p <= 1.0:
      raise UserError(f'top_k must be >= 0 and top_p in (0, 1], got {options.top_k}, '
                      f'{options.top_p}')
    return labels

  def gpt_empty_cache(self, rows, length: int | None = None):
    """Zero KV cache (layers, 2, rows, H, length, 64) in the GPT's compute dtype (default
    length: `cache_len`; speculative rounds need room for K ids past the end)."""
    c = self.gpt_cfg
    dtype = jnp.bfloat16 if c.dtype == 'bfloat16' else jnp.float32
    return jnp.zeros((c.n_layer, 2, rows, c.n_head, length or c.cache_len, 64), dtype)

  def _prefix(self, prefix_ids, b):
    L = self.gpt_cfg.block_size
    if prefix_ids is None:
      return np.zeros((b, 0), np.int32)
    prefix = np.asarray(prefix_ids, np.int32)
    if prefix.ndim == 1:
      prefix = np.broadcast_to(prefix, (b, prefix.shape[0]))
    if prefix.ndim != 2 or prefix.shape[0] != b or prefix.shape[1] >= L:
      raise UserError(f'prefix_ids must have shape (P,) or ({b}, P) with P < {L}, got '
                      f'{np.shape(prefix_ids)}')
    if prefix.size and (prefix.min() < 0 or prefix.max() >= self.gpt_cfg.vocab_size):
      raise UserError(f'prefix ids must lie in [0, {self.gpt_cfg.vocab_size})')
    return np.ascontiguousarray(prefix)


def layout_prefix(tokenizer: TokenizerRunner, image, groups: int) -> np.ndarray:
  """The first `groups` groups of ids of a reference image (H, W, 3) or (1, H, W, 3) in [-1, 1]
  (zero-shot layout control: pass as `prefix_ids`)."""
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  g = tokenizer.cfg.num_groups
  if not 0 <= groups < g:
    raise UserError(f'prefix groups must be in 0..{g - 1}, got {groups}')
  ids = tokenizer.encode(image)
  return ids[0, :groups * tokenizer.cfg.queries_per_group]


def to_uint8(images) -> np.ndarray:
  """Images in about [-1, 1] -> uint8 as the official FID PNGs: trunc(clamp(127.5 x + 128))."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)
