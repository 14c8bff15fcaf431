"""xAR's `System` (see `disa_jax.systems.base`): how the shared commands build, sample, decode,
convert and count FLOPs of an xAR model. A stage is a cell (4 per image); DiSA chooses the
Euler-Maruyama evaluations per cell (`steps.py`). The sampler adapter (`SystemSampler`) wraps
`sampling.XARSampler` in the engine's contract: `plan` / `compile` / `generate` /
`last_stats` / `compile_log`; tokens are returned row-major (B, 256, 16) like MAR's, so the
KL-16 decoder and the token preview of `disa_jax.tokenizers.image` apply unchanged.
Heavy imports happen inside the hooks."""

from __future__ import annotations

import dataclasses
import time
import types

import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.base import System


def model_config(config):
  from disa_jax.systems.xar.config import XARConfig

  return XARConfig.from_dict(dict(config.model))


def token_layout(cfg):
  """The fields the shared image tokenizers read (patch 1 on the 16x16 KL-16 grid)."""
  return types.SimpleNamespace(patch_size=1, seq_h=cfg.grid, seq_w=cfg.grid,
                               vae_embed_dim=cfg.token_dim, vae_stride=16)


def build_model(config, *, seed: int = 0):
  from flax import nnx

  from disa_jax.systems.xar.model import XAR

  cfg = model_config(config)
  if config.get('checkpoint'):
    model = load_model(config.checkpoint, expect_config=cfg.to_dict())
    return model, f'checkpoint {config.checkpoint}'
  return XAR(cfg, rngs=nnx.Rngs(seed)), 'RANDOM WEIGHTS (no checkpoint given)'


def load_model(path, *, expect_config=None, overrides=None):
  from disa_jax.checkpoint import CheckpointError
  from disa_jax.systems.xar.io import load_xar

  model = load_xar(path)
  if expect_config is not None and model.cfg.to_dict() != dict(expect_config):
    raise CheckpointError(f'{path} holds {model.cfg}, not the config\'s model '
                          f'{dict(expect_config)}; use the matching config (configs/xar/*.py)')
  return model


def stage_plan(sampling):
  """Evaluations per cell (DiSA presets / strategies / explicit list) as a StepPlan."""
  from disa_jax.schedules import StepPlan
  from disa_jax.systems.xar.steps import steps_from_config

  variant = sampling.get('variant', None) or 'B'
  return StepPlan(steps=tuple(steps_from_config(sampling, variant)), max_timestep=None)


@dataclasses.dataclass
class XARRunPlan:
  """The static shapes of one batch: one compiled function per (cell, evaluations)."""

  batch: int
  steps: tuple
  cfg: float

  @property
  def backbone_buckets(self):
    return [(s, n) for s, n in enumerate(self.steps)]

  @property
  def head_buckets(self):
    return []

  def report(self) -> dict:
    n = 64
    tokens = [n * k + (n if s else 0) for s, k in enumerate(self.steps)]
    return {'steps_requested': list(self.steps), 'steps_actual': list(self.steps),
            'tokens_per_step': [n] * len(self.steps),
            'head_token_steps_per_image': int(sum(tokens)),
            'head_token_steps_per_image_padded': int(sum(tokens)),
            'head_padding_waste': 0.0, 'encoder_padding_waste': 0.0}


@dataclasses.dataclass
class XARStats:
  plan: XARRunPlan
  compile_s: float
  sample_s: float
  compiles: dict

  def as_dict(self) -> dict:
    return {'compile_s': self.compile_s, 'sample_s': self.sample_s,
            'compiles': {str(k): v for k, v in self.compiles.items()}, **self.plan.report()}


class SystemSampler:
  """The engine's sampler contract over `XARSampler` (one device; `mesh` must be None)."""

  def __init__(self, model, mesh=None, matmul_precision=None):
    from disa_jax.systems.xar.sampling import XARSampler

    if mesh is not None:
      raise UserError('xAR sampling runs on one device; set --config.runtime.num_devices=1')
    self.mesh = None
    self.sampler = XARSampler(model)
    self.cfg = model.cfg
    self.matmul_precision = matmul_precision
    self.compile_log: dict = {}
    self.last_stats = None

  def plan(self, batch_size: int, *, steps, cfg: float = 1.0, **_ignored) -> XARRunPlan:
    return XARRunPlan(batch=int(batch_size), steps=tuple(int(n) for n in steps), cfg=float(cfg))

  def _run(self, labels, key, steps, cfg):
    import contextlib

    import jax

    ctx = (jax.default_matmul_precision(self.matmul_precision) if self.matmul_precision
           else contextlib.nullcontext())
    with ctx:
      _, tokens = self.sampler.generate(labels, steps=steps, cfg=cfg, key=key,
                                        return_tokens=True)
      from disa_jax.systems.xar.model import cell_order
      raster = np.empty_like(np.asarray(tokens))
      raster[:, cell_order(self.cfg)] = np.asarray(tokens)
    return raster

  def compile(self, plan: XARRunPlan) -> float:
    """Compiles every (cell, evaluations) function of `plan` by one warm-up batch; seconds."""
    import jax

    before = dict(self.sampler.traces)
    t0 = time.perf_counter()
    self._run(np.zeros(plan.batch, np.int32), jax.random.key(0), plan.steps, plan.cfg)
    dt = time.perf_counter() - t0
    for k, v in self.sampler.traces.items():
      if v > before.get(k, 0):
        self.compile_log[('backbone', *k)] = dt
    return dt

  def generate(self, conditions, key, *, steps, cfg: float = 1.0, image_ids=None,
               progress=None, **_ignored):
    """Row-major tokens (B, 256, 16) (before the VAE's 1/0.2325 scaling)."""
    plan = self.plan(len(conditions), steps=steps, cfg=cfg)
    before = self.sampler.compile_count
    t0 = time.perf_counter()
    tokens = self._run(np.asarray(conditions, np.int32), key, plan.steps, plan.cfg)
    if progress is not None:
      for _ in plan.steps:
        progress(1)
    wall = time.perf_counter() - t0
    compiled = self.sampler.compile_count > before
    self.last_stats = XARStats(plan=plan, compile_s=wall if compiled else 0.0,
                               sample_s=0.0 if compiled else wall,
                               compiles=dict(self.sampler.traces))
    return tokens


def make_sampler(model, config, mesh):
  return SystemSampler(model, mesh, config.runtime.get('matmul_precision') or None)


def conditions(config, num_images: int, *, order: str = 'cycle') -> np.ndarray:
  from disa_jax.engine.runner import class_labels
  from disa_jax.systems.mar.system import parse_classes

  return class_labels(num_images, parse_classes(config.sampling.classes),
                      model_config(config).class_num, order=order)


def condition_count(config) -> int:
  return model_config(config).class_num


def make_decoder(config, model):
  tk = config.tokenizer
  if tk.kind == 'kl16' and tk.get('vae'):
    from disa_jax.checkpoint import load_vae
    from disa_jax.tokenizers import image as tok

    vae = load_vae(tk.vae)
    return tok.VAETokenizer(token_layout(model.cfg), vae, scale=tk.scale,
                            matmul_precision=config.runtime.get('matmul_precision') or None)
  return None


def token_preview(model, tokens):
  from disa_jax.tokenizers.image import token_preview as preview

  return preview(token_layout(model.cfg), tokens)


def validate(config) -> None:
  """xAR-specific checks (before any output is touched)."""
  s = config.sampling
  cells = model_config(config).num_cells
  if s.get('num_iter', cells) != cells:
    raise UserError(f'xAR has {cells} AR stages (cells); --num_iter must be {cells}, got '
                    f'{s.num_iter}')
  if s.get('cfg_schedule', 'linear') != 'linear':
    raise UserError('xAR ramps CFG linearly over cells (official); --cfg_schedule must be linear')
  if s.get('temperature', 1.0) != 1.0:
    raise UserError('the xAR sampler has no temperature; leave --temperature at 1.0')
  stage_plan(s)


def flops(model_cfg, plan) -> dict:
  from disa_jax.systems.xar.config import XARConfig
  from disa_jax.systems.xar.flops import run_flops

  cfg = model_cfg if isinstance(model_cfg, XARConfig) else XARConfig.from_dict(dict(model_cfg))
  return run_flops(cfg, plan.steps)


SYSTEM = System(
  name='xar',
  build_model=build_model,
  load_model=load_model,
  stage_plan=stage_plan,
  make_sampler=make_sampler,
  conditions=conditions,
  condition_count=condition_count,
  make_decoder=make_decoder,
  token_preview=token_preview,
  validate=validate,
  converter='disa_jax.systems.xar.convert',
  flops=flops,
)
