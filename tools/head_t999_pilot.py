"""How fast MAR's diffusion head alone learns its t=999 regime (issue 16; docs/benchmarks.md).

  python tools/head_t999_pilot.py --steps=1000 --last-fraction=0.3
  python tools/head_t999_pilot.py --steps=1000 --tail-fraction=0.25 --tail-start=900
  python tools/head_t999_pilot.py --steps=4800 --rows=1024 --last-fraction=0.3

Trains the official `SimpleMLPAdaLN` head (width 256, 2 blocks: the MNIST recipe's) on its own
with the official diffusion loss, random 128-d conditions and x0 ~ N(-1.4, 0.8^2) per value
(the MNIST tokens' statistics), AdamW with the recipe's settings and a cosine decay, and
prints the eps RMS error at t = 999, 990 and 900 at a few steps. `--last-fraction` moves that
fraction of rows to t = 999 (the recipe's `train.last_t_fraction`), `--tail-fraction` draws
that fraction of rows uniformly from [tail-start, 999] instead. `--rows` (head rows per step,
4096), `--width` / `--depth`, `--lr` / `--final-lr-fraction`, `--channels` (values per token)
and `--data=sparse` (x0 = 0 for 75 % of rows, like background patches) are the levers compared
in docs/benchmarks.md.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from disa_jax.diffusion.losses import diffusion_loss, loss_tables, q_sample
from disa_jax.heads.mlp_adaln import SimpleMLPAdaLN

COND = 128


def x0_and_condition(key, n, data='gauss', channels=16):
  """x0 (n, channels), condition (n, COND). 'gauss': N(-1.4, 0.8^2) per value (the MNIST
  tokens' marginal); 'sparse': 0 for 75 % of rows (background patches), else |N(0, 2.5^2)|."""
  k1, k2, k3 = jax.random.split(key, 3)
  if data == 'gauss':
    x0 = jax.random.normal(k1, (n, channels)) * 0.8 - 1.4
  else:
    on = jax.random.uniform(k3, (n, 1)) < 0.25
    x0 = jnp.where(on, jnp.abs(jax.random.normal(k1, (n, channels))) * 2.5, 0.0)
  return x0, jax.random.normal(k2, (n, COND))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--lr', type=float, default=6e-4)
  p.add_argument('--weight-decay', type=float, default=0.02)
  p.add_argument('--last-fraction', type=float, default=0.0)
  p.add_argument('--tail-fraction', type=float, default=0.0)
  p.add_argument('--tail-start', type=int, default=900)
  p.add_argument('--final-lr-fraction', type=float, default=0.01,
                 help='the cosine decay ends at this fraction of --lr')
  p.add_argument('--rows', type=int, default=4096, help='head rows per step')
  p.add_argument('--width', type=int, default=256)
  p.add_argument('--depth', type=int, default=2)
  p.add_argument('--data', choices=('gauss', 'sparse'), default='gauss')
  p.add_argument('--channels', type=int, default=16,
                 help='values per token (16: the recipe\'s 4x4 patches)')
  a = p.parse_args(argv)
  rows = a.rows

  tables = loss_tables()
  graphdef, params = nnx.split(SimpleMLPAdaLN(a.channels, a.width, 2 * a.channels, COND, a.depth,
                                              rngs=nnx.Rngs(0)))
  warmup = min(50, max(1, a.steps // 4))
  lr = optax.warmup_cosine_decay_schedule(0.0, a.lr, warmup, max(a.steps, warmup + 1),
                                           a.lr * a.final_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(3.0),
                   optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=a.weight_decay))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    k_data, k_tail, k_loss = jax.random.split(key, 3)
    x0, z = x0_and_condition(k_data, rows, a.data, a.channels)
    tail = int(a.tail_fraction * rows)

    def loss_fn(p):
      net = nnx.merge(graphdef, p)
      if tail:  # rows [0, tail) at t ~ U{tail_start..999}, the rest as the official loss
        t = jax.random.randint(k_tail, (tail,), a.tail_start, 1000)
        noise = jax.random.normal(jax.random.fold_in(k_tail, 1), (tail, a.channels))
        out = net(q_sample(x0[:tail], t, noise, tables), t.astype(jnp.float32), z[:tail])
        tail_mse = jnp.mean((out[:, :a.channels] - noise) ** 2)
        rest, _ = diffusion_loss(net, x0[tail:], z[tail:], jnp.ones(rows - tail), k_loss,
                                 tables=tables)
        return (tail * tail_mse + (rows - tail) * rest) / rows
      return diffusion_loss(net, x0, z, jnp.ones(rows), k_loss, tables=tables,
                            last_t_fraction=a.last_fraction)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  x0, z = x0_and_condition(jax.random.key(123), 4096, a.data, a.channels)
  noise = jax.random.normal(jax.random.key(7), x0.shape)

  def error(params, t):
    tt = jnp.full((x0.shape[0],), t)
    out = nnx.merge(graphdef, params)(q_sample(x0, tt, noise, tables), tt.astype(jnp.float32), z)
    return float(jnp.sqrt(jnp.mean((out[:, :a.channels] - noise) ** 2)))

  key, t0 = jax.random.key(0), time.time()
  for i in range(1, a.steps + 1):
    key, k = jax.random.split(key)
    params, opt, _ = step(params, opt, k)
    if i in (100, 300, 1000, 2000, 4000, 8000) or i == a.steps:
      print(f'step {i}: eps RMS error t=999 {error(params, 999):.4f}  t=990 '
            f'{error(params, 990):.4f}  t=900 {error(params, 900):.4f}  ({time.time() - t0:.0f} s)',
            flush=True)


if __name__ == '__main__':
  main()
