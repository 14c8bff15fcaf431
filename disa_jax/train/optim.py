"""Optimizer of the official recipe (LTH14/mar `main_mar.py`, `util/misc.py`, `util/lr_sched.py`).

- AdamW, betas (0.9, 0.95), eps 1e-8, decoupled weight decay (torch semantics: the decay is
  scaled by the learning rate), applied only where `weight_decay_mask` is True;
- global-norm gradient clipping (3.0) before the update, as `NativeScaler(clip_grad=3.0)`;
- lr = blr * global_batch / 256, linear warmup from 0, then constant (or half-cycle cosine).
  The official schedule is per iteration in fractional epochs; here it is per step.
"""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx


def path_name(path) -> str:
  """'encoder_blocks.0.attn.qkv.kernel' from a jax key path (Variable `.value` dropped)."""
  parts = []
  for k in path:
    name = getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None)))
    if name == 'value' and isinstance(k, jax.tree_util.GetAttrKey):
      continue
    parts.append(str(name))
  return '.'.join(parts)


def decays(name: str, shape) -> bool:
  """The official `add_weight_decay` rule: no decay for 1-D params, biases and the head."""
  return not (len(shape) == 1 or name.endswith('.bias') or 'diffloss' in name)


def weight_decay_mask(params):
  """Same-structure tree of bools: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(path_name(p), x.shape), params)


def learning_rate(cfg, global_batch: int) -> float:
  """Absolute lr: `cfg.lr` if set (> 0), else blr * global_batch / 256."""
  if cfg.get('lr', 0.0) and cfg.lr > 0:
    return float(cfg.lr)
  return float(cfg.blr) * global_batch / 256.0


def lr_schedule(cfg, global_batch: int):
  """Linear warmup over `warmup_steps`, then constant (or cosine to `min_lr`)."""
  peak = learning_rate(cfg, global_batch)
  warm = int(cfg.warmup_steps)
  total = int(cfg.num_steps)
  kind = cfg.get('lr_schedule', 'constant')
  if kind not in ('constant', 'cosine'):
    raise ValueError(f'lr_schedule must be constant or cosine, got {kind!r}')
  min_lr = float(cfg.get('min_lr', 0.0))

  def fn(step):
    import jax.numpy as jnp

    s = jnp.asarray(step, jnp.float32)
    w = peak * s / max(warm, 1)
    if kind == 'constant':
      after = jnp.full_like(s, peak)
    else:
      frac = (s - warm) / max(total - warm, 1)
      after = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(frac, 0, 1)))
    return jnp.where(s < warm, w, after)

  return fn


def make_optimizer(cfg, global_batch: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the official weight-decay mask."""
  chain = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(optax.adamw(lr_schedule(cfg, global_batch), b1=cfg.b1, b2=cfg.b2, eps=1e-8,
                           weight_decay=cfg.weight_decay, mask=weight_decay_mask))
  return optax.chain(*chain)


def param_state(model) -> nnx.State:
  return nnx.state(model, nnx.Param)
