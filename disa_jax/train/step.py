"""MAR's training forward pass and one optimisation step (LTH14/mar `models/mar.py` forward,
`engine_mar.py` train_one_epoch), with static shapes.

Per batch (tokens [B, L, C], labels [B]):
  orders     a uniform random permutation of the L positions per image
  r          ~ truncated normal on [mask_ratio_min, 1], mean 1, std 0.25 (one per batch)
  masked     the first ceil(L r) positions of each order (1 = predicted, loss counted)
  encoder    sees the class buffer + the visible tokens only: the remaining positions
             gathered to a static V = L - ceil(L mask_ratio_min), padding excluded as keys
  class      class_emb[label], replaced by fake_latent with probability label_drop_prob
  decoder    -> z [B, L, Dd]; the head loss runs on all B L rows repeated
             `diffusion_batch_mul` times (each repeat with its own t and noise) and is
             averaged over the masked rows only (`disa_jax.diffusion.losses`).
Dropout (attention and projections, 0.1) uses explicit keys.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from disa_jax.diffusion.losses import diffusion_loss, loss_tables

MASK_STD = 0.25


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: step, raw and EMA weights, optimizer, RNG."""

  step: jax.Array          # int32 scalar: number of updates done
  params: Any              # nnx.State of the MAR parameters (fp32 master weights)
  ema: Any                 # same structure, exponential moving average
  opt_state: Any
  rng: jax.Array           # uint32 key data of the run's random stream


def max_visible(seq_len: int, mask_ratio_min: float) -> int:
  """Static number of encoder token slots: L - ceil(L * mask_ratio_min)."""
  return seq_len - int(math.ceil(seq_len * mask_ratio_min))


def sample_mask_ratio(key, mask_ratio_min: float):
  """r ~ N(1, 0.25^2) truncated to [mask_ratio_min, 1] (scipy truncnorm((min-1)/.25, 0))."""
  lower = (mask_ratio_min - 1.0) / MASK_STD
  return 1.0 + MASK_STD * jax.random.truncated_normal(key, lower, 0.0, (), jnp.float32)


def num_masked_tokens(ratio, seq_len: int):
  """ceil(L * r), clipped to [ceil(L * min), L] by the caller's ratio range."""
  return jnp.ceil(seq_len * ratio).astype(jnp.int32)


def random_orders(key, batch: int, seq_len: int):
  return jax.vmap(lambda k: jax.random.permutation(k, seq_len))(
    jax.random.split(key, batch)).astype(jnp.int32)


def mask_from_orders(orders, num_masked):
  """mask [B, L] float: 1 at orders[:, :num_masked] (official `random_masking`)."""
  b, seq = orders.shape
  rank = jnp.argsort(orders, axis=1)  # rank[b, p] = index of position p in the order
  return (rank < num_masked).astype(jnp.float32)


def visible_positions(orders, num_masked, size: int):
  """Positions orders[:, num_masked:], ascending, padded to `size`; (pos, valid) [B, size]."""
  b, seq = orders.shape
  idx = num_masked + jnp.arange(size)
  valid = idx < seq
  window = jnp.take(orders, jnp.minimum(idx, seq - 1), axis=1)
  srt = jnp.sort(jnp.where(valid, window, seq), axis=1)
  pos = jnp.where(valid, srt, srt[:, :1] % seq)
  return pos.astype(jnp.int32), jnp.broadcast_to(valid, (b, size))


def mar_loss(model, tokens, labels, key, *, train: bool = True, tables=None,
             last_t_fraction: float = 0.0):
  """Official MAR training loss (scalar) and metrics for tokens [B, L, C], labels [B]."""
  c = model.config
  b, seq, ch = tokens.shape
  k_order, k_ratio, k_drop, k_enc, k_dec, k_diff = jax.random.split(key, 6)
  orders = random_orders(k_order, b, seq)
  ratio = sample_mask_ratio(k_ratio, c.mask_ratio_min)
  n_masked = num_masked_tokens(ratio, seq)
  mask = mask_from_orders(orders, n_masked)
  vis_pos, vis_valid = visible_positions(orders, n_masked, max_visible(seq, c.mask_ratio_min))
  labels = jnp.asarray(labels, jnp.int32)
  if train and c.label_drop_prob > 0:
    drop = jax.random.bernoulli(k_drop, c.label_drop_prob, (b,))
    labels = jnp.where(drop, -1, labels)
  class_vec = model.class_embedding(labels)
  vis_tok = jnp.take_along_axis(tokens, vis_pos[..., None], axis=1)
  x = model.encode(vis_tok, vis_pos, class_vec, valid=vis_valid,
                   dropout_key=k_enc if train else None)
  z = model.decode(x, vis_pos, valid=vis_valid, dropout_key=k_dec if train else None)
  mul = c.diffusion_batch_mul
  target = jnp.tile(tokens.reshape(b * seq, ch), (mul, 1))
  zz = jnp.tile(z.reshape(b * seq, -1), (mul, 1))
  mm = jnp.tile(mask.reshape(b * seq), (mul,))
  loss, terms = diffusion_loss(model.diffloss.net, target, zz, mm, k_diff, tables=tables,
                               last_t_fraction=last_t_fraction)
  metrics = {'loss': loss, 'mse': terms['mse'], 'vb': terms['vb'], 'mask_ratio': ratio,
             'num_masked': n_masked.astype(jnp.float32)}
  return loss, metrics


def sample_latents(mean, logvar, key, scale: float):
  """z = (mean + exp(logvar / 2) eps) * scale with logvar clamped to [-30, 20] (official
  `DiagonalGaussianDistribution.sample` then `.mul_(0.2325)`)."""
  logvar = jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps) * scale


def ema_update(ema, params, rate: float):
  return jax.tree.map(lambda e, p: e * rate + p.astype(e.dtype) * (1.0 - rate), ema, params)


def train_step(state: TrainState, batch, *, graphdef, tx: optax.GradientTransformation,
               ema_rate: float, latent_scale: float, patch_size: int,
               last_t_fraction: float = 0.0):
  """One update. batch = {'mean', 'logvar' [B, h, w, c] (NHWC moments), 'label' [B]}.

  Non-finite loss or gradients leave the state unchanged (and are reported in the metrics as
  `finite` = 0) so the caller can stop with the last good weights.
  """
  from disa_jax.systems.mar.model import patchify

  key = jax.random.wrap_key_data(state.rng)
  key, k_lat, k_loss = jax.random.split(key, 3)
  lat = sample_latents(batch['mean'], batch['logvar'], k_lat, latent_scale)
  tokens = patchify(lat, patch_size)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    return mar_loss(model, tokens, batch['label'], k_loss, tables=_TABLES,
                    last_t_fraction=last_t_fraction)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  gnorm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema, params, ema_rate)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  new = TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
                   rng=jax.random.key_data(key))
  keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
  new = jax.tree.map(keep, new, state)
  new = new.replace(rng=jax.random.key_data(key))
  metrics = {**metrics, 'grad_norm': gnorm, 'finite': finite.astype(jnp.float32)}
  return new, metrics


_TABLES = {k: v for k, v in loss_tables().items()}
