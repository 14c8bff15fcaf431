"""The training step FlowAR and xAR share (their losses: `systems/flowar/train.py`,
`systems/xar/train.py`).

State: `TrainState` (step, params, EMA params, optax state, uint32 key data). One step: latents
sampled from the cached VAE moments (`train.step.sample_latents`, times `latent_scale`), the
system's random draws and loss (`loss(model, latents, labels, label_drop_prob=, **draws)` ->
(loss, per-stage losses)), gradients, the optax update, EMA; a non-finite loss or gradient
norm leaves the state unchanged except its key (`finite` = 0 in the metrics). `FlowTrainer`:
what `disa_jax.train.loop` needs (see `loop.MARTrainer`), for a model class over a config class.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data


def init_state(model, tx, seed: int) -> TrainState:
  params = nnx.state(model, nnx.Param)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def flow_train_step(state: TrainState, batch, *, graphdef, tx: optax.GradientTransformation,
                    ema_rate: float, latent_scale: float, label_drop_prob: float, loss,
                    draw_randomness, stage_metric: str):
  """One update; batch = {'mean', 'logvar' (B, H, W, C) NHWC moments, 'label' (B,)}. Metrics:
  loss, `<stage_metric><s>` per stage, grad_norm, finite."""
  from disa_jax.train.step import ema_update, sample_latents

  key = jax.random.wrap_key_data(state.rng)
  key, k_lat, k_loss = jax.random.split(key, 3)
  lat = sample_latents(batch['mean'], batch['logvar'], k_lat, latent_scale)
  b = lat.shape[0]

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    r = draw_randomness(k_loss, b, model.cfg)
    return loss(model, lat, batch['label'], label_drop_prob=label_drop_prob, **r)

  (value, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  gnorm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = TrainState(step=state.step + 1, params=params, ema=ema_update(state.ema, params, ema_rate),
                   opt_state=opt_state, rng=jax.random.key_data(key))
  finite = jnp.isfinite(value) & jnp.isfinite(gnorm)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  new = new.replace(rng=jax.random.key_data(key))
  metrics = {f'{stage_metric}{s}': per[s] for s in range(per.shape[0])}
  return new, {'loss': value, **metrics, 'grad_norm': gnorm, 'finite': finite.astype(jnp.float32)}


class FlowTrainer:
  """`disa_jax.train.loop`'s trainer for a flow system: subclasses set `kind`, `model_cls`,
  `config_cls`, `train_step` (the system's step function) and `data_side(cfg)`."""

  kind: str
  model_cls: type
  config_cls: type

  @staticmethod
  def data_side(cfg) -> int:
    raise NotImplementedError

  @staticmethod
  def train_step(*args, **kwargs):
    raise NotImplementedError

  def __init__(self, config):
    from disa_jax.errors import UserError

    self.model_cfg = self.config_cls.from_dict(dict(config.model))
    side = self.data_side(self.model_cfg)
    self.data_shape = (side, side, self.model_cfg.token_dim)     # cached moments (NHWC)
    self.label_drop_prob = config.train.get('label_drop_prob', 0.1)
    if not (isinstance(self.label_drop_prob, int | float) and 0 <= self.label_drop_prob <= 1):
      raise UserError('--config.train.label_drop_prob must be a number in [0, 1] (official '
                      f'0.1), got {self.label_drop_prob!r}')
    self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: self.model_cls(self.model_cfg,
                                                                       rngs=nnx.Rngs(0))))

  def init_state(self, tx, seed: int) -> TrainState:
    return init_state(self.model_cls(self.model_cfg, rngs=nnx.Rngs(seed)), tx, seed + 1)

  def step_fn(self, *, tx, ema_rate: float, latent_scale: float):
    return functools.partial(self.train_step, graphdef=self.graphdef, tx=tx, ema_rate=ema_rate,
                             latent_scale=latent_scale, label_drop_prob=self.label_drop_prob)
