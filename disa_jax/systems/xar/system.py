"""xAR's `System` (see `disa_jax.systems.base`): how the shared commands build, sample, decode,
convert and count FLOPs of an xAR model. A stage is a cell (4 per image); DiSA chooses the
Euler-Maruyama evaluations per cell (`steps.py`). The sampler adapter
(`engine.XAREngineSampler`) wraps `sampling.XARSampler` in the engine's contract (per-image
randomness); tokens are returned row-major (B, 256, 16) like MAR's, so the KL-16 decoder and
the token preview of `disa_jax.tokenizers.image` apply unchanged. Heavy imports happen inside
the hooks."""

from __future__ import annotations

import types

from disa_jax.errors import UserError
from disa_jax.systems.base import System
from disa_jax.systems.common.labels import class_condition_hooks


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


def make_sampler(model, config, mesh):
  """`engine.XAREngineSampler` (data parallel over `mesh`; per-image randomness)."""
  from disa_jax.systems.xar.engine import XAREngineSampler

  return XAREngineSampler(model, cfg=config.sampling.cfg, mesh=mesh,
                          matmul_precision=config.runtime.get('matmul_precision') or None)


conditions, condition_count = class_condition_hooks(model_config)


def make_decoder(config, model):
  """KL-16 VAE decoder, pixels (the digits models: image = tokens / scale), or None."""
  tk = config.tokenizer
  if tk.kind == 'pixels':
    from disa_jax.tokenizers.image import PixelTokenizer

    return PixelTokenizer(token_layout(model.cfg), scale=tk.scale)
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
  train_step='disa_jax.systems.xar.train',
)
