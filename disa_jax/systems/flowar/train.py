"""FlowAR training: the official loss and one optimisation step.

Official: `FlowAR.forward` (`FlowAR_DiSA/models/flowar.py`), `SILoss` (`models/flowloss.py`,
prediction 'v', linear path, uniform t) and the recipe of `main_flowar.py` / `engine.py`. For
latents x (B, 16, 16, 16) NHWC (= VAE sample * 0.2325) and labels y (B,):
  y' = null class (class_num) where U(0,1) < label_drop_prob (0.1)
  x_s = area(x -> m_s x m_s) for the scales m_s < 16, x_4 = x          (B, n_s, 16) row-major
  u_{s+1} = area(bicubic(x_s -> 16) -> m_{s+1})   (teacher forcing; `next_scale.next_scale_input`)
  tokens = [class_emb(y'), z_proj(u_1), ..., z_proj(u_4)]             (B, 341, D)
  z = trunk_full(tokens, class_emb(y'))                                block-causal
  per scale s: t_b ~ U(0, 1) per image, eps ~ N(0, I) (B, n_s, 16)
    x_t = (1 - t) x_s + t eps,  v* = eps - x_s,  v = head(x_t, trunc(1000 t), z_s)
    L_s = mean over images of mean over (n_s, 16) of (v - v*)^2
  loss = sum_s L_s * n_s / 256
Recipe (shared with MAR's `disa_jax.train.optim`): AdamW betas (0.9, 0.95), weight decay 0.02 on
everything but 1-D parameters and biases, lr = blr * batch / 256 (blr 1e-4), linear warmup then
cosine to min_lr (or constant), global-norm clip 3.0, EMA 0.9999 after every update, fp32.
The step itself (EMA, skipping non-finite updates) is `systems/common/train.flow_train_step`.
Difference: the official trunk applies attention / projection dropout 0.1 during training;
this model has no dropout layers (documented, not emulated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from disa_jax.systems.common.train import FlowTrainer, TrainState, flow_train_step, init_state
from disa_jax.systems.flowar.config import FlowARConfig
from disa_jax.systems.flowar.model import FlowAR
from disa_jax.systems.flowar.next_scale import area_matrix, next_scale_input

__all__ = ['TrainState', 'Trainer', 'draw_randomness', 'flowar_loss', 'init_state', 'scale_targets',
           'train_step']


def scale_targets(latents, scales) -> list:
  """Ground truth per scale: area-downsampled (B, n_s, C) row-major; latents (B, H, W, C)."""
  b, h, _, c = latents.shape
  out = []
  for m in scales:
    if m == h:
      out.append(latents.reshape(b, h * h, c))
      continue
    a = jnp.asarray(area_matrix(h, m))
    out.append(jnp.einsum('oh,bhwc,pw->bopc', a, latents, a,
                          precision='highest').reshape(b, m * m, c))
  return out


def flowar_loss(model, latents, labels, *, t, noise, drop, label_drop_prob: float = 0.1):
  """The official loss with every random draw given: t (S, B) in [0, 1), noise (list of
  (B, n_s, C)), drop (B,) uniforms for the label drop. Returns (loss, per-scale losses)."""
  cfg = model.cfg
  labels = jnp.where(drop < label_drop_prob, cfg.null_class, labels).astype(jnp.int32)
  targets = scale_targets(latents, cfg.scales)
  cond = model.class_embedding(labels)
  inputs = [next_scale_input(targets[i], m, cfg.scales[i + 1])
            for i, m in enumerate(cfg.scales[:-1])]
  tokens = jnp.concatenate([cond[:, None], model.embed_tokens(jnp.concatenate(inputs, 1))], 1)
  z = model.trunk_full(tokens, cond)
  per_scale = []
  full = cfg.scales[-1] ** 2
  for s, m in enumerate(cfg.scales):
    lo, hi = cfg.starts[s], cfg.starts[s] + m * m
    x0, eps, ts = targets[s], noise[s], t[s][:, None, None]
    xt = (1 - ts) * x0 + ts * eps
    tau = jnp.trunc(t[s] * 1000).astype(jnp.int32)
    v = model.velocity(xt, tau, z[:, lo:hi], s)
    per_scale.append(jnp.mean((v - (eps - x0)) ** 2) * (m * m) / full)
  return sum(per_scale), jnp.stack(per_scale)


def draw_randomness(key, batch: int, cfg) -> dict:
  """t (S, B), noise per scale, drop (B,) for `flowar_loss`."""
  k_t, k_n, k_d = jax.random.split(key, 3)
  keys = jax.random.split(k_n, len(cfg.scales))
  return {'t': jax.random.uniform(k_t, (len(cfg.scales), batch)),
          'noise': [jax.random.normal(k, (batch, m * m, cfg.token_dim))
                    for k, m in zip(keys, cfg.scales, strict=True)],
          'drop': jax.random.uniform(k_d, (batch,))}


def train_step(state: TrainState, batch, *, graphdef, tx: optax.GradientTransformation,
               ema_rate: float, latent_scale: float = 0.2325, label_drop_prob: float = 0.1):
  """One update. batch = {'mean', 'logvar' (B, 16, 16, 16) NHWC moments, 'label' (B,)}.
  A non-finite loss or gradient leaves the state unchanged (`finite` = 0 in the metrics)."""
  return flow_train_step(state, batch, graphdef=graphdef, tx=tx, ema_rate=ema_rate,
                         latent_scale=latent_scale, label_drop_prob=label_drop_prob,
                         loss=flowar_loss, draw_randomness=draw_randomness,
                         stage_metric='loss_scale')


class Trainer(FlowTrainer):
  """What `disa_jax.train.loop` needs to train FlowAR (see `loop.MARTrainer`)."""

  kind = 'flowar'
  model_cls = FlowAR
  config_cls = FlowARConfig
  train_step = staticmethod(train_step)

  @staticmethod
  def data_side(cfg) -> int:
    return cfg.scales[-1]
