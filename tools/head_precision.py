"""The diffusion head's eps error by timestep, from `disa-train` checkpoints (issue 16).

  python tools/head_precision.py --workdir=runs/mnist --steps=100,200,300

For each checkpoint step and both weight sets (raw, EMA) it prints the RMS of
eps_hat - eps over 100 held-out MNIST digits (64 tokens each) at t in {999, 990, 950, 500,
100}, with the head's condition z from the model with all tokens masked (r1.0, the first AR
step) and half of them (r0.5). Without DiSA's clamp the first sampling step is t=999, where
the posterior mean moves ~316x the eps error (100 steps; `spaced_schedule`), so the original
MAR schedule needs this error ~1e-3 at t=999 (docs/benchmarks.md, issue 16).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.config import mnist_config
from disa_jax.data import mnist
from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.diffusion.losses import loss_tables, q_sample
from disa_jax.systems.mar.model import patchify
from disa_jax.train import loop
from disa_jax.train.step import max_visible, random_orders, visible_positions

TIMESTEPS = (999, 990, 950, 500, 100)


def head_errors(model, tokens, labels, ratio: float, tables) -> dict[int, float]:
  b, seq, ch = tokens.shape
  c = model.config
  orders = random_orders(jax.random.key(0), b, seq)
  n_masked = jnp.asarray(int(round(seq * ratio)))
  vis_pos, vis_valid = visible_positions(orders, n_masked, max_visible(seq, c.mask_ratio_min))
  vis_tok = jnp.take_along_axis(tokens, vis_pos[..., None], axis=1)
  x = model.encode(vis_tok, vis_pos, model.class_embedding(labels), valid=vis_valid)
  z = model.decode(x, vis_pos, valid=vis_valid).reshape(b * seq, -1)
  x0 = tokens.reshape(b * seq, ch)
  out = {}
  for t in TIMESTEPS:
    noise = jax.random.normal(jax.random.key(t), x0.shape)
    tt = jnp.full((x0.shape[0],), t)
    eps = model.diffloss.net(q_sample(x0, tt, noise, tables), tt.astype(jnp.float32), z)[:, :ch]
    out[t] = float(jnp.sqrt(jnp.mean((eps - noise) ** 2)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', required=True, help='comma-separated checkpoint steps')
  a = p.parse_args()
  cfg = mnist_config()
  x, y = mnist.load_split('heldout')
  idx = np.arange(0, len(y), 5)
  tokens = jnp.asarray(np.asarray(patchify(jnp.asarray(x[idx]), cfg.model.patch_size))
                       * cfg.data.latent_scale)
  labels = jnp.asarray(y[idx])
  tables = loss_tables()
  first = spaced_schedule(100).sampling_tables()
  gain = float(first['coef1'][0] * first['sqrt_recipm1_ac'][0])
  print(f'first unclamped step (100 steps): d mean / d eps = {gain:.0f}')
  graphdef = loop.trainer_of(cfg).graphdef
  for step in (int(s) for s in a.steps.split(',')):
    state, _ = loop.restore_state(a.workdir, cfg, step=step)
    for name, params in (('raw', state.params), ('ema', state.ema)):
      model = nnx.merge(graphdef, params)
      cells = []
      for ratio in (1.0, 0.5):
        errs = head_errors(model, tokens, labels, ratio, tables)
        cells += [f'r{ratio} t{t} {e:.4f}' for t, e in errs.items()]
      print(f'step {step} {name}: eps RMS error  ' + '  '.join(cells), flush=True)


if __name__ == '__main__':
  main()
