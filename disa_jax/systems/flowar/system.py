"""FlowAR's `System` (see `disa_jax.systems.base`): how the shared commands build, sample, decode,
convert, benchmark and train a FlowAR model (`FlowAR_DiSA/models/flowar.py`).

A stage is a scale (1, 2, 4, 8, 16 tokens per side); DiSA chooses the flow steps per scale
(`steps.py`: presets baseline / disa, the shared strategies, an explicit list). Tokens are the
last scale's (B, 256, 16) row-major KL-16 latents times 0.2325, decoded by the shared KL-16
VAE (`tokenizers/image.VAETokenizer`, latent = tokens / 0.2325). Heavy imports happen inside
the hooks.
"""

from __future__ import annotations

import math
import types

from disa_jax.errors import UserError
from disa_jax.systems.base import System
from disa_jax.systems.common.labels import class_condition_hooks

PRESET_ALIASES = {'mar': 'baseline'}


def model_config(config):
  """The `FlowARConfig` of `config.model`."""
  from disa_jax.systems.flowar.config import FlowARConfig

  return FlowARConfig.from_dict(dict(config.model))


def build_model(config, *, seed: int = 0):
  """(model, description): the model directory in `config.checkpoint`, or random weights."""
  from flax import nnx

  from disa_jax.systems.flowar.model import FlowAR

  if config.get('checkpoint'):
    return load_model(config.checkpoint, expect_config=dict(config.model)), \
      f'checkpoint {config.checkpoint}'
  return FlowAR(model_config(config), rngs=nnx.Rngs(seed)), 'RANDOM WEIGHTS (no checkpoint given)'


def load_model(path, *, expect_config=None, overrides=None):
  """A FlowAR model directory (`disa-convert flowar`, `disa-train --export`)."""
  del overrides                      # FlowAR has no runtime-only model fields
  from disa_jax.checkpoint import CheckpointError, architecture_diff, read_meta
  from disa_jax.systems.flowar.config import FlowARConfig
  from disa_jax.systems.flowar.io import load_flowar

  if expect_config is not None:
    meta, stored = read_meta(path)
    if meta.get('kind') == 'flowar':
      want = FlowARConfig.from_dict(dict(expect_config)).to_dict()
      diff = architecture_diff(want, FlowARConfig.from_dict(stored).to_dict())
      if diff:
        raise CheckpointError(
          f'config and checkpoint disagree on the FlowAR architecture ({"; ".join(diff)}); use '
          'the config of the checkpoint\'s variant (configs/flowar/{s,l,h}.py)')
  return load_flowar(path)


def stage_plan(sampling):
  """Requested flow steps per scale (`steps.steps_from_config`); no clamp."""
  from disa_jax.schedules import StepPlan
  from disa_jax.systems.flowar.steps import resolve_scale_steps

  preset = PRESET_ALIASES.get(sampling.preset, sampling.preset)
  # variant: the presets' official counts only fill an unset upper / lower (configs set both)
  steps = resolve_scale_steps(variant='S', preset=preset, strategy=sampling.strategy or None,
                              upper=sampling.upper_steps, lower=sampling.lower_steps,
                              steps=sampling.steps or None)
  return StepPlan(steps=tuple(steps), max_timestep=None)


def make_sampler(model, config, mesh):
  from disa_jax.systems.flowar.engine import FlowAREngineSampler

  s = config.sampling
  return FlowAREngineSampler(model, cfg=s.cfg, guidance=s.guidance, mesh=mesh,
                             matmul_precision=config.runtime.get('matmul_precision') or None,
                             solver=s.get('solver', 'euler'))


conditions, condition_count = class_condition_hooks(model_config)


TOKENIZER_KINDS = ('kl16', 'pixels', 'none')


def latent_layout(cfg):
  """What `VAETokenizer` reads off a model config: tokens (B, side^2, C) row-major, one token
  per latent pixel."""
  side = cfg.scales[-1]
  return types.SimpleNamespace(patch_size=1, seq_h=side, seq_w=side, vae_embed_dim=cfg.token_dim,
                               vae_stride=16)


def make_decoder(config, model):
  """KL-16 VAE decoder (latent = tokens / config.tokenizer.scale), pixels (the digits models:
  image = tokens / scale), or None (tokens only)."""
  tk = config.tokenizer
  if tk.kind == 'pixels':           # the bundled digits model: tokens are scaled pixels
    from disa_jax.tokenizers.image import PixelTokenizer

    return PixelTokenizer(latent_layout(model.cfg), scale=tk.scale)
  if tk.kind == 'kl16' and tk.get('vae'):
    import jax

    from disa_jax.checkpoint import load_vae
    from disa_jax.tokenizers import image as tok

    rt = config.runtime
    n = rt.get('num_devices', 0)
    vae = load_vae(tk.vae)
    return tok.VAETokenizer(latent_layout(model.cfg), vae, scale=tk.scale,
                            matmul_precision=rt.get('matmul_precision') or None,
                            devices=jax.local_devices()[:n] if n else None)
  if tk.kind not in TOKENIZER_KINDS:
    raise UserError(f'FlowAR decodes KL-16 latents or pixel tokens; --config.tokenizer.kind '
                    f'must be kl16, pixels or none, got {tk.kind!r}')
  return None


def token_preview(model, tokens):
  from disa_jax.tokenizers.image import token_preview as preview

  return preview(latent_layout(model.cfg), tokens)


def _finite(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def validate(config) -> None:
  """FlowAR-specific checks of a sampling config (before any output is touched)."""
  s = config.sampling
  model_config(config)                                    # architecture fields
  g = s.get('guidance', None)
  if not (_finite(g) and 0.0 <= g <= 1.0):
    raise UserError(f'--config.sampling.guidance must be a finite number in [0, 1] (CFG applies '
                    f'while t <= guidance), got {g!r}')
  bc = s.get('baseline_cfg', 1.0)
  if not (_finite(bc) and bc >= 0):
    raise UserError(f'--config.sampling.baseline_cfg must be a finite number >= 0, got {bc!r}')
  if s.get('cfg_schedule', 'linear') != 'linear':
    raise UserError(f'FlowAR ramps CFG linearly over scales (official); --cfg_schedule '
                    f'{s.cfg_schedule!r} is not available, use linear')
  if s.get('temperature', 1.0) != 1.0:
    raise UserError(f'the FlowAR Euler ODE sampler has no noise temperature; leave '
                    f'--temperature at 1.0 (got {s.temperature})')
  from disa_jax.diffusion.flow import FLOW_SOLVERS

  solver = s.get('solver', 'euler')
  if solver not in FLOW_SOLVERS:
    raise UserError(f'--config.sampling.solver={solver!r} is not a FlowAR flow solver; choose one '
                    f'of {", ".join(FLOW_SOLVERS)}')
  mt = s.get('max_timestep', None)
  if mt is not None:
    raise UserError(f'FlowAR has no timestep clamp; drop --max_timestep (got {mt})')
  n = s.get('num_iter', None)
  scales = len(model_config(config).scales)
  if n is not None and n != scales:
    raise UserError(f'FlowAR has one AR stage per scale ({scales}); drop --num_iter (got {n})')
  if config.tokenizer.kind not in TOKENIZER_KINDS:
    raise UserError(f'FlowAR decodes KL-16 latents or pixel tokens; --config.tokenizer.kind '
                    f'must be kl16, pixels or none, got {config.tokenizer.kind!r}')
  stage_plan(s)                                           # schedule errors


def flops(model_cfg, plan, *, cfg_scale: float = 2.0, solver: str = 'euler') -> dict:
  """FLOPs per image of a StepPlan (CFG doubles the rows unless cfg_scale == 1; Heun evaluates
  the head 2 N - 1 times per scale)."""
  from disa_jax.systems.flowar.config import FlowARConfig
  from disa_jax.systems.flowar.flops import run_flops

  cfg = model_cfg if isinstance(model_cfg, FlowARConfig) else FlowARConfig.from_dict(
    dict(model_cfg))
  return run_flops(cfg, list(plan.steps), cfg_scale=cfg_scale, solver=solver)


SYSTEM = System(
  name='flowar',
  build_model=build_model,
  load_model=load_model,
  stage_plan=stage_plan,
  make_sampler=make_sampler,
  conditions=conditions,
  condition_count=condition_count,
  make_decoder=make_decoder,
  token_preview=token_preview,
  validate=validate,
  converter='disa_jax.systems.flowar.convert',
  flops=flops,
  train_step='disa_jax.systems.flowar.train',
)
