"""MAR's `System` (see `disa_jax.systems.base`): how the shared commands build, sample, decode,
convert and count FLOPs of a MAR model (LTH14/mar). Heavy imports happen inside the hooks."""

from __future__ import annotations

import math

import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.base import System


def model_config(config):
  """The `MARConfig` of `config.model`."""
  from disa_jax.systems.mar.model import MARConfig

  return MARConfig.from_dict(dict(config.model))


def build_model(config, *, seed: int = 0):
  """(model, description): the checkpoint in `config.checkpoint`, or random weights."""
  from flax import nnx

  from disa_jax.checkpoint import load_mar
  from disa_jax.systems.mar.model import COMPUTE_FIELDS, MAR

  model_cfg = dict(config.model)
  if config.get('checkpoint'):
    runtime = {k: model_cfg[k] for k in COMPUTE_FIELDS if k in model_cfg}
    model = load_mar(config.checkpoint, expect_config=model_cfg, overrides=runtime)
    return model, f'checkpoint {config.checkpoint}'
  return MAR(model_config(config), rngs=nnx.Rngs(seed)), 'RANDOM WEIGHTS (no checkpoint given)'


def load_model(path, *, expect_config=None, overrides=None):
  from disa_jax.checkpoint import load_mar

  return load_mar(path, expect_config=expect_config, overrides=overrides)


def stage_plan(sampling):
  """Requested diffusion steps per MAR iteration and the clamp, from `config.sampling`."""
  from disa_jax.schedules import resolve_steps

  max_t = sampling.get('max_timestep', None)
  if max_t is None:
    max_t = 'preset'
  elif max_t < 0:
    max_t = None
  return resolve_steps(num_iter=sampling.num_iter, preset=sampling.preset,
                       strategy=sampling.strategy, upper=sampling.upper_steps,
                       lower=sampling.lower_steps, steps=sampling.steps or None,
                       max_timestep=max_t)


def make_sampler(model, config, mesh):
  from disa_jax.engine.aot import trace_dir_beside_xla_cache
  from disa_jax.systems.mar.sampling import Sampler

  rt = config.runtime
  return Sampler(model, mesh=mesh, enc_bucket=rt.enc_bucket, max_head_waste=rt.max_head_waste,
                 matmul_precision=rt.matmul_precision or None,
                 solver=config.sampling.get('solver', 'ddpm'),
                 eta=config.sampling.get('eta', 0.0),
                 head_steps=rt.get('head_steps', 'exact'),
                 cache=config.sampling.get('cache', '') or None,
                 trace_cache=trace_dir_beside_xla_cache(rt.get('trace_cache', True)),
                 compile_threads=rt.get('compile_threads', 1),
                 background_compile=rt.get('background_compile', False))


def parse_classes(text: str) -> list[int]:
  if not text:
    return []
  try:
    return [int(x) for x in str(text).replace(' ', '').split(',') if x]
  except ValueError:
    raise UserError(f'--classes must be comma-separated integers, got {text!r}') from None


def conditions(config, num_images: int, *, order: str = 'cycle') -> np.ndarray:
  """Class label of every image (`config.sampling.classes` cycled; without classes, all
  classes cycled (`order='cycle'`) or in the official evaluation order, class i repeated
  num_images / class_num times in a row (`order='blocks'`))."""
  from disa_jax.engine.runner import class_labels

  return class_labels(num_images, parse_classes(config.sampling.classes),
                      model_config(config).class_num, order=order)


def condition_count(config) -> int:
  return model_config(config).class_num


def make_decoder(config, model):
  """The decoder from tokens to images for this config, or None (tokens only)."""
  import jax

  from disa_jax.tokenizers import image as tok

  tk = config.tokenizer
  if tk.kind == 'pixels':
    return tok.PixelTokenizer(model.config, scale=tk.scale)
  if tk.kind == 'kl16' and tk.get('vae'):
    from disa_jax.checkpoint import load_vae

    rt = config.runtime
    n = rt.get('num_devices', 0)
    vae = load_vae(tk.vae, overrides={'dtype': tk.get('dtype', 'float32')})
    return tok.VAETokenizer(model.config, vae, scale=tk.scale,
                            matmul_precision=rt.get('matmul_precision') or None,
                            devices=jax.local_devices()[:n] if n else None)
  return None


def token_preview(model, tokens):
  from disa_jax.tokenizers.image import token_preview as preview

  return preview(model.config, tokens)


def validate(config) -> None:
  """MAR-specific checks of a sampling config (before any output is touched)."""
  seq = model_config(config).seq_len
  n = config.sampling.num_iter
  if not 1 <= n <= seq:
    raise UserError(f'--num_iter must be in [1, {seq}] for this model ({seq} tokens), got {n}')
  from disa_jax.diffusion.ddpm import SOLVERS

  solver, eta = config.sampling.get('solver', 'ddpm'), config.sampling.get('eta', 0.0)
  if solver not in SOLVERS:
    raise UserError(f'--config.sampling.solver={solver!r} is not a head solver; choose one of '
                    f'{", ".join(SOLVERS)}')
  if not (math.isfinite(eta) and eta >= 0):
    raise UserError(f'--config.sampling.eta must be finite and >= 0, got {eta}')
  from disa_jax.systems.mar.lazy import parse_cache

  parse_cache(config.sampling.get('cache', ''))   # CacheSpecError (a UserError) if bad
  head_steps = config.runtime.get('head_steps', 'exact')
  if head_steps not in ('exact', 'traced'):
    raise UserError(f'--config.runtime.head_steps must be exact or traced, got {head_steps!r}')


def flops(model_cfg, plan, *, official: bool = True) -> dict:
  from disa_jax.systems.mar.flops import plan_flops

  return plan_flops(model_cfg, plan, official=official)


SYSTEM = System(
  name='mar',
  build_model=build_model,
  load_model=load_model,
  stage_plan=stage_plan,
  make_sampler=make_sampler,
  conditions=conditions,
  condition_count=condition_count,
  make_decoder=make_decoder,
  token_preview=token_preview,
  validate=validate,
  converter='disa_jax.systems.mar.convert',
  flops=flops,
  train_step='disa_jax.train.step',
)
