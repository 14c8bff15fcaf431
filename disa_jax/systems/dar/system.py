"""D-AR's `System` (see `disa_jax.systems.base`): how the shared commands build, sample, decode
and convert a D-AR model (showlab/D-AR: GPT over discrete ids + the tokenizer's flow decoder).

Mapping onto the seam:
  stage       one group of Q ids (D-AR-L/XL: 8 groups of 32). `stage_plan` returns one entry
              per group, each = 1: the streaming decoder takes exactly one flow (Euler / AB2)
              step when a group completes. D-AR has no per-stage head steps for DiSA to choose
              (spec section 7): `StepPlan.steps` only records that 1-NFE-per-group structure
              (shorter with the coarser-grid knob `sampling.decoder_steps`), and
              `max_timestep` is None.
  tokens      int32 ids (B, L). The decoder is D-AR's own diffusion decoder, run *during*
              generation (`RunSampler.run` returns images and per-group previews), so the
              commands use this system's own command bodies (`commands`, in
              `disa_jax.systems.dar.commands`).
  randomness  image i's categorical uniforms (L,) and decoder noise (H, W, 3) come from
              fold_in(key(seed), i): independent of the batch size and of the batch it is in.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.base import System


@dataclasses.dataclass
class DarModel:
  """The two networks of a D-AR run."""
  gpt: object
  tokenizer: object

  @property
  def config(self):
    return self.gpt.cfg


def build_model(config, *, seed: int = 0):
  from disa_jax.systems.dar.config import build_models

  gpt, tok = build_models(config, seed=seed)
  parts = [f'GPT {config.checkpoint}' if config.checkpoint else 'GPT RANDOM WEIGHTS',
           f'tokenizer {config.tokenizer_checkpoint}' if config.tokenizer_checkpoint
           else 'tokenizer RANDOM WEIGHTS']
  if not (config.checkpoint and config.tokenizer_checkpoint):
    parts.append('no checkpoint given for the parts marked RANDOM')
  return DarModel(gpt, tok), '; '.join(parts)


def load_model(path, *, expect_config=None, overrides=None):
  """A converted GPT directory (`disa-convert dar`); the tokenizer is loaded separately."""
  from disa_jax.systems.dar.convert import load_gpt

  del expect_config
  return load_gpt(path, dtype=(overrides or {}).get('dtype'))


def stage_plan(sampling):
  """One decoder step per group (or per step of the coarser grid): StepPlan((1,) * S, None)."""
  from disa_jax.schedules import StepPlan

  groups = sampling.get('num_groups', None) or 8
  s = sampling.get('decoder_steps', 0) or groups
  return StepPlan(steps=(1,) * s, max_timestep=None)


SPECULATION_STREAM = 1 << 20   # fold_in tag of the speculative acceptance / residual draws


@dataclasses.dataclass
class RunStats:
  compile_s: float
  gpt_s: float                  # target + draft GPT seconds
  decoder_s: float
  tokens: int
  compiles: dict
  speculation: dict | None = None

  def as_dict(self):
    return dataclasses.asdict(self)


class RunSampler:
  """The D-AR sampler of a run: per-image keys, layout prefixes, previews, the knobs."""

  def __init__(self, model: DarModel, config, mesh=None):
    from disa_jax.systems.dar.sampling import Sampler, SamplingOptions, TokenizerRunner

    rt, s = config.runtime, config.sampling
    prec = rt.matmul_precision or None
    self.mesh = mesh
    self.tok = TokenizerRunner(model.tokenizer, matmul_precision=prec)
    self.sampler = Sampler(model.gpt, self.tok, matmul_precision=prec)
    self.options = SamplingOptions(cfg=str(s.cfg), temperature=float(s.temperature),
                                   top_k=int(s.top_k), top_p=float(s.top_p))
    self.num_tokens = int(s.get('num_tokens', 0)) or None
    self.decoder_steps = int(s.get('decoder_steps', 0)) or None
    self.draft_tokens = int(s.get('draft_tokens', 4))
    self.speculate_from = int(s.get('speculate_from', 0)) or None
    self.draft = draft_sampler(config, prec)
    self.speculate = self.draft is not None     # full-length runs go through the draft
    self._speculative: dict = {}
    self.compile_log: dict = {}
    self.last_stats = None

  @property
  def speculative(self):
    """The SpeculativeSampler for the current draft_tokens (None without a draft, or with
    `speculate` off)."""
    if self.draft is None or not self.speculate:
      return None
    key = (self.draft_tokens, self.speculate_from)
    if key not in self._speculative:
      from disa_jax.systems.dar.speculative import SpeculativeSampler

      self._speculative[key] = SpeculativeSampler(self.sampler, self.draft,
                                                  draft_tokens=self.draft_tokens,
                                                  start=self.speculate_from)
    return self._speculative[key]

  @property
  def cfg(self):
    return self.sampler.gpt_cfg

  def image_randomness(self, image_ids):
    """(uniforms (B, L), noise (B, H, W, 3)) of images `image_ids` under the run key."""
    import jax
    import jax.numpy as jnp

    L, s = self.cfg.block_size, self.tok.cfg.image_size

    def one(key):
      k_u, k_n = jax.random.split(key)
      return (jax.random.uniform(k_u, (L,), jnp.float32),
              jax.random.normal(k_n, (s, s, 3), jnp.float32))

    keys = jax.vmap(lambda i: jax.random.fold_in(self.key, i))(jnp.asarray(image_ids,
                                                                           jnp.uint32))
    u, n = jax.vmap(one)(keys)
    return np.asarray(u), np.asarray(n)

  def set_key(self, key):
    self.key = key

  def speculation_draws(self, image_ids):
    """(acceptance, residual) uniforms (B, L) of images `image_ids` for speculative decoding
    (their own stream under fold_in(fold_in(key, i), SPECULATION_STREAM))."""
    import jax
    import jax.numpy as jnp

    L = self.cfg.block_size

    def one(i):
      k = jax.random.fold_in(jax.random.fold_in(self.key, i), SPECULATION_STREAM)
      k_a, k_r = jax.random.split(k)
      return jax.random.uniform(k_a, (L,)), jax.random.uniform(k_r, (L,))

    a, r = jax.vmap(one)(jnp.asarray(image_ids, jnp.uint32))
    return np.asarray(a), np.asarray(r)

  def _compiles(self) -> dict:
    out = {**self.sampler.compiles,
           **{f'tokenizer_{k}': v for k, v in self.tok.compiles.items()}}
    for spec in self._speculative.values():
      for k, v in spec.compiles.items():
        out[k] = out.get(k, 0) + v
    return out

  def run(self, labels, image_ids, *, prefix=None, previews=False, decode=True,
          num_tokens=None):
    """Generation (ids, images in about [-1, 1], previews) of one batch; speculative with a
    draft (sampling.draft) for full-length runs."""
    uniforms, noise = self.image_randomness(image_ids)
    before = sum(self._compiles().values())
    t0 = time.perf_counter()
    spec = self.speculative if not (num_tokens or self.num_tokens) else None
    if spec is not None:
      if previews or self.decoder_steps:
        raise UserError('speculative decoding (--draft) decodes after the last id: drop '
                        '--previews / --decoder-steps, or the draft')
      accept_u, resid_u = self.speculation_draws(image_ids)
      gen = spec.generate(labels, options=self.options, uniforms=uniforms,
                          accept_uniforms=accept_u, resid_uniforms=resid_u, noise=noise,
                          prefix_ids=prefix, decode=decode)
    else:
      gen = self.sampler.generate(labels, options=self.options, uniforms=uniforms,
                                  noise=noise, prefix_ids=prefix, decode=decode,
                                  previews=previews, num_tokens=num_tokens or self.num_tokens,
                                  decoder_steps=self.decoder_steps)
    wall = time.perf_counter() - t0
    after = sum(self._compiles().values())
    n_tok = int(gen.ids.shape[0]) * (gen.num_ids - (0 if prefix is None else np.shape(prefix)[-1]))
    self.last_stats = RunStats(
      compile_s=0.0, gpt_s=gen.seconds['gpt'] + gen.seconds.get('draft', 0.0),
      decoder_s=gen.seconds['decoder'], tokens=n_tok, compiles=self._compiles(),
      speculation=gen.speculation)
    gen.seconds['wall'] = wall
    gen.seconds['new_compiles'] = after - before
    return gen

  # The shared contract (ids only; the commands of this system use `run`).
  def plan(self, batch_size, *, steps=(), **sampling):
    return None

  def compile(self, plan) -> float:
    return 0.0

  def generate(self, conditions, key, *, steps=(), image_ids=None, progress=None, **sampling):
    self.set_key(key)
    ids = np.arange(len(conditions)) if image_ids is None else np.asarray(image_ids)
    return self.run(conditions, ids, decode=False).ids


def make_sampler(model, config, mesh):
  return RunSampler(model, config, mesh)


def draft_sampler(config, precision):
  """A `Sampler` over the draft GPT of `sampling.draft`, or None."""
  from disa_jax.systems.dar.config import build_draft
  from disa_jax.systems.dar.sampling import Sampler

  draft = build_draft(config, seed=int(config.sampling.seed))
  return None if draft is None else Sampler(draft, matmul_precision=precision)


def conditions(config, num_images: int, *, order: str = 'cycle') -> np.ndarray:
  """Class of every image: `sampling.classes` cycled, else all classes (cycled, or in blocks of
  num_images / num_classes for evaluation)."""
  from disa_jax.engine.runner import class_labels
  from disa_jax.systems.mar.system import parse_classes

  return class_labels(num_images, parse_classes(config.sampling.classes),
                      int(config.model.gpt.num_classes), order=order)


def condition_count(config) -> int:
  return int(config.model.gpt.num_classes)


class IdDecoder:
  """ids (B, L) -> uint8 images with the official decode (noise from fold_in(key, image id))."""

  def __init__(self, tok_runner, key):
    self.tok, self.key = tok_runner, key

  def decode(self, ids, image_ids=None):
    import jax

    from disa_jax.systems.dar.sampling import to_uint8

    ids = np.asarray(ids)
    image_ids = np.arange(len(ids)) if image_ids is None else np.asarray(image_ids)
    s = self.tok.cfg.image_size
    noise = np.stack([np.asarray(jax.random.normal(
      jax.random.split(jax.random.fold_in(self.key, int(i)))[1], (s, s, 3))) for i in image_ids])
    return to_uint8(self.tok.decode(ids, noise))


def make_decoder(config, model):
  import jax

  from disa_jax.systems.dar.sampling import TokenizerRunner

  return IdDecoder(TokenizerRunner(model.tokenizer,
                                   matmul_precision=config.runtime.matmul_precision or None),
                   jax.random.key(config.sampling.seed))


def validate(config) -> None:
  """D-AR sampling settings (before any output is touched)."""
  from disa_jax.systems.dar.sampling import cfg_schedule

  s, gpt, tok = config.sampling, config.model.gpt, config.model.tokenizer
  for name in ('num_images', 'batch_size'):
    if s[name] < 1:
      raise UserError(f'--{name} must be >= 1, got {s[name]}')
  cfg_schedule(str(s.cfg), int(gpt.block_size))
  if not (np.isfinite(s.temperature) and s.temperature > 0):
    raise UserError(f'--temperature must be a finite number > 0, got {s.temperature}')
  if s.top_k < 0 or not 0.0 < s.top_p <= 1.0:
    raise UserError(f'top_k must be >= 0 and top_p in (0, 1], got {s.top_k}, {s.top_p}')
  groups, q, L = int(tok.num_groups), int(tok.queries_per_group), int(gpt.block_size)
  k = int(s.prefix_groups)
  if s.layout_from and s.prefix_from_sample:
    raise UserError('--layout-from and --prefix-from-sample both set the prefix; pass one')
  if (s.layout_from or s.prefix_from_sample) and not 1 <= k < groups:
    raise UserError(f'--prefix-groups must be in 1..{groups - 1} with --layout-from or '
                    f'--prefix-from-sample, got {k}')
  if k and not (s.layout_from or s.prefix_from_sample):
    raise UserError('--prefix-groups needs --layout-from=IMAGE or --prefix-from-sample')
  nt = int(s.get('num_tokens', 0))
  if nt and not k * q < nt <= L:
    raise UserError(f'--num-tokens must be in {k * q + 1}..{L} (0 = all), got {nt}')
  ds = int(s.get('decoder_steps', 0))
  if ds and not 1 <= ds <= groups:
    raise UserError(f'--decoder-steps must be in 1..{groups} (0 = the official {groups}), '
                    f'got {ds}')
  if s.layout_from:
    import os

    if not os.path.isfile(os.path.expanduser(s.layout_from)):
      raise UserError(f'--layout-from: no such image file {s.layout_from}')
    from disa_jax.systems.dar.commands import load_reference

    load_reference(s.layout_from, int(tok.image_size))      # readable as an image
  draft = str(s.get('draft', '') or '')
  if draft:
    if s.previews or ds or nt:
      raise UserError('speculative decoding (--draft) generates every id and decodes after the '
                      'last: drop --previews / --decoder-steps / --num-tokens, or the draft')
    from disa_jax.systems.dar.config import random_draft_size

    if random_draft_size(draft) is None:
      import os

      if not os.path.exists(os.path.expanduser(draft)):
        raise UserError(f'--draft {draft} does not exist (a disa-convert dar directory, or '
                        'random:SIZE)')
    j = int(s.get('speculate_from', 0))
    if j and not 1 <= j < L:
      raise UserError(f'--speculate-from must be in 1..{L - 1} (0 = the second half), got {j}')
    if int(s.get('draft_tokens', 4)) < 1:
      raise UserError(f'--draft-tokens must be >= 1, got {s.draft_tokens}')
  for name in ('checkpoint', 'tokenizer_checkpoint'):
    path = config.get(name)
    if path:
      import os

      if not os.path.exists(os.path.expanduser(path)):
        raise UserError(f'{name} {path} does not exist')


SYSTEM = System(
  name='dar',
  build_model=build_model,
  load_model=load_model,
  stage_plan=stage_plan,
  make_sampler=make_sampler,
  conditions=conditions,
  condition_count=condition_count,
  make_decoder=make_decoder,
  validate=validate,
  converter='disa_jax.systems.dar.convert',
  flag_names=('previews', 'layout_from', 'prefix_groups', 'prefix_from_sample', 'num_tokens',
              'decoder_steps', 'top_k', 'top_p', 'tokenizer_checkpoint', 'draft',
              'draft_tokens', 'speculate_from'),
  commands='disa_jax.systems.dar.commands',
)
