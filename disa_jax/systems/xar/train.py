"""xAR training: the noisy-context flow-matching loss and one optimisation step.

Official: `xAR.forward` in `xAR_DiSA/models/xar.py` (= OliverRensu/xAR) as the spec describes it
(`flowar_xar.md` §5.3 item 3, §2.7). For latents x (B, 16, 16, 16) NHWC (= VAE sample * 0.2325)
and labels y (B,):
  y' = null class (class_num) where U(0,1) < label_drop_prob (0.1)
  x0 = x in cell-major token order (B, 256, 16) (`model.cell_order`)
  per image b and cell k: t_bk = sigmoid(n_bk), n_bk ~ N(0, 1)  (every cell its own noise level:
    the later cells learn to use a noisy context, which is what "noisy context learning" means)
  eps ~ N(0, I) (B, 256, 16);  x_t = (1 - t) x0 + t eps per cell;  v* = eps - x0
  v = XAR.forward_full(x_t, y', tau = trunc(1000 t))   all 4 cells at once, cell-causal mask
  loss = mean over (B, 256, 16) of (v - v*)^2
The timestep the network sees is trunc(1000 t), the convention of the sampler (`time_to_tau`).
Recipe: the shared AdamW + EMA step (`systems/common/train.py`: TrainState, EMA, skipping
non-finite updates); xAR's optimiser settings are in `configs/xar/*.py` (AdamW betas 0.9 / 0.96,
blr 5e-5 as the xAR README; the official engine's fp16 autocast is not emulated: fp32 here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from disa_jax.systems.common.train import FlowTrainer, TrainState, flow_train_step, init_state
from disa_jax.systems.xar.config import XARConfig
from disa_jax.systems.xar.model import XAR, cell_order

__all__ = ['TrainState', 'Trainer', 'draw_randomness', 'init_state', 'train_step', 'xar_loss']


def to_cell_major(latents, cfg):
  """(B, H, W, C) NHWC latents -> (B, L, C) tokens in the model's cell-major order."""
  b, h, w, c = latents.shape
  return latents.reshape(b, h * w, c)[:, jnp.asarray(cell_order(cfg))]


def xar_loss(model, latents, labels, *, t, noise, drop, label_drop_prob: float = 0.1):
  """The loss with every random draw given: t (B, cells) in (0, 1), noise (B, L, C) cell-major,
  drop (B,) uniforms for the label drop. Returns (loss, per-cell losses (cells,))."""
  cfg = model.cfg
  labels = jnp.where(drop < label_drop_prob, cfg.null_class, labels).astype(jnp.int32)
  x0 = to_cell_major(latents, cfg)
  t_tok = jnp.repeat(t, cfg.cell_tokens, axis=1)[:, :, None]          # (B, L, 1)
  xt = (1 - t_tok) * x0 + t_tok * noise
  tau = jnp.trunc(t * 1000).astype(jnp.int32)
  v = model.forward_full(xt, labels, tau)
  err = ((v - (noise - x0)) ** 2).reshape(x0.shape[0], cfg.num_cells, -1)
  per_cell = err.mean(axis=(0, 2))
  return per_cell.mean(), per_cell


def draw_randomness(key, batch: int, cfg) -> dict:
  """t (B, cells) = sigmoid(N(0, 1)), noise (B, L, C), drop (B,) for `xar_loss`."""
  k_t, k_n, k_d = jax.random.split(key, 3)
  return {'t': jax.nn.sigmoid(jax.random.normal(k_t, (batch, cfg.num_cells))),
          'noise': jax.random.normal(k_n, (batch, cfg.seq_len, cfg.token_dim)),
          'drop': jax.random.uniform(k_d, (batch,))}


def train_step(state: TrainState, batch, *, graphdef, tx: optax.GradientTransformation,
               ema_rate: float, latent_scale: float = 0.2325, label_drop_prob: float = 0.1):
  """One update. batch = {'mean', 'logvar' (B, 16, 16, C) NHWC moments, 'label' (B,)}.
  A non-finite loss or gradient leaves the state unchanged (`finite` = 0 in the metrics)."""
  return flow_train_step(state, batch, graphdef=graphdef, tx=tx, ema_rate=ema_rate,
                         latent_scale=latent_scale, label_drop_prob=label_drop_prob,
                         loss=xar_loss, draw_randomness=draw_randomness, stage_metric='loss_cell')


class Trainer(FlowTrainer):
  """What `disa_jax.train.loop` needs to train xAR (see `loop.MARTrainer`)."""

  kind = 'xar'
  model_cls = XAR
  config_cls = XARConfig
  train_step = staticmethod(train_step)

  @staticmethod
  def data_side(cfg) -> int:
    return cfg.grid
