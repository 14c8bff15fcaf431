"""The DiSA paper's evidence that later tokens are more constrained, measured per AR step.

All three start from normal sampling runs (the sampler's own AR loop; `Sampler.generate(...,
on_backbone=...)` hands over each step's decoder conditions z before the head runs):

- sampling variance: with the context of AR step s fixed (the generation state of the run, i.e.
  its z and CFG scale), draw `samples` (100) tokens from the diffusion head with different noise;
  per token the variance across samples averaged over the C token dimensions, then averaged
  over the step's tokens and images.
- straightness: for each token's denoising trajectory x_T -> ... -> x_0 (fresh noise, the same
  context), the mean over diffusion steps k of cos(x_{k-1} - x_k, x_0 - x_T) (1 = straight),
  averaged over trajectories, tokens and images.
- predictability: (z_i, final sampled token x_i) pairs with their AR step from generated
  images; a small MLP (JAX / optax) is trained on 80 % of the images and its held-out mean
  squared error is reported per AR step (with the error of predicting the mean token and R^2).

Both probes use a fixed number of diffusion steps (`probe_steps`, default 50) at every AR step,
so the comparison across steps is not confounded by a DiSA schedule. Single host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax import validation
from disa_jax.diffusion.ddpm import device_tables, p_sample_loop, p_sample_trajectory
from disa_jax.engine.runner import generate_checked


@dataclasses.dataclass
class StepContext:
  """The generation state of one AR step of one batch."""

  step: object               # disa_jax.systems.mar.plan.ARStep
  z: np.ndarray              # [B, (2,) n_query, Dd] decoder conditions (cond, uncond under CFG)
  pred_pos: np.ndarray       # [B, n_query] positions predicted at this step (padded)
  pred_valid: np.ndarray     # [B, n_query]


def generate_with_contexts(sampler, labels, key, *, image_ids, steps, max_timestep, sampling):
  """(tokens [B, L, C], [StepContext per AR step]) of one batch of a normal sampling run."""
  contexts = []

  def hook(s, z, pred_pos, pred_valid):
    contexts.append(StepContext(s, np.asarray(z), np.asarray(pred_pos),
                                np.asarray(pred_valid)))

  tokens = generate_checked(sampler, labels, key, steps=steps, max_timestep=max_timestep,
                            cfg=sampling.cfg, cfg_schedule=sampling.cfg_schedule,
                            temperature=sampling.temperature, image_ids=image_ids,
                            on_backbone=hook)
  return np.asarray(tokens), contexts


def _split_conditions(ctx: StepContext):
  """(z_cond [R, Dd], z_uncond [R, Dd] or None, valid [R]) with R = B * n_query."""
  z = ctx.z
  if z.ndim == 4:
    zc, zu = z[:, 0], z[:, 1]
    return zc.reshape(-1, zc.shape[-1]), zu.reshape(-1, zu.shape[-1]), ctx.pred_valid.ravel()
  return z.reshape(-1, z.shape[-1]), None, ctx.pred_valid.ravel()


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_steps', 'samples', 'mode'))
def _probe(state, zc, zu, key, tables, cfg, temperature, *, graphdef, num_steps: int,
           samples: int, mode: str):
  """Per row of zc [R, Dd]: 'variance' -> mean over C of the variance over `samples` draws;
  'straightness' -> mean over `samples` trajectories of the mean step-vs-chord cosine."""
  net = nnx.merge(graphdef, state).diffloss.net
  r, ch = zc.shape[0], net.in_channels
  n = samples * r
  zc = jnp.tile(zc, (samples, 1))
  zu = None if zu is None else jnp.tile(zu, (samples, 1))
  x = jax.random.normal(jax.random.fold_in(key, 0), (n, ch))
  noise_at = lambda i: jax.random.normal(jax.random.fold_in(key, i + 1), (n, ch))  # noqa: E731
  kw = dict(num_steps=num_steps, cfg=cfg, temperature=temperature, noise_at=noise_at)
  if mode == 'variance':
    x0 = p_sample_loop(net, zc, zu, x, tables, **kw).reshape(samples, r, ch)
    return jnp.var(x0, axis=0, ddof=1).mean(axis=-1)
  traj = p_sample_trajectory(net, zc, zu, x, tables, **kw)        # [A + 1, n, C]
  return path_straightness(traj).reshape(samples, r).mean(axis=0)


def path_straightness(traj):
  """traj [A + 1, ..., C] (x_T first) -> mean_k cos(x_{k-1} - x_k, x_0 - x_T) per path."""
  d = traj[1:] - traj[:-1]
  chord = traj[-1] - traj[0]
  num = jnp.sum(d * chord, axis=-1)
  den = jnp.linalg.norm(d, axis=-1) * jnp.linalg.norm(chord, axis=-1)
  return jnp.mean(num / jnp.maximum(den, 1e-12), axis=0)


class StepAccumulator:
  """Per-AR-step lists of per-token values -> mean / std / count."""

  def __init__(self):
    self.values: dict[int, list[np.ndarray]] = {}

  def add(self, step: int, values) -> None:
    self.values.setdefault(step, []).append(np.asarray(values, np.float64))

  def summary(self, name: str) -> list[dict]:
    out = []
    for s in sorted(self.values):
      v = np.concatenate(self.values[s])
      out.append({'ar_step': s, 'tokens': int(v.size), name: float(v.mean()),
                  f'{name}_std': float(v.std()), f'{name}_sem': float(v.std() / np.sqrt(v.size))})
    return out


def probe_steps(sampler, labels, key, *, plan, sampling, batch_size: int, measures,
                samples: int = 100, probe_steps: int = 50, probe_max_timestep=None,
                progress=None) -> dict[str, list[dict]]:
  """Runs `measures` (subset of {'variance', 'straightness'}) over the AR steps of sampling
  runs for `labels`; returns {measure: [per AR step summary]}."""
  tables = device_tables(probe_steps, probe_max_timestep)
  from disa_jax.diffusion.gaussian import spaced_schedule

  actual = spaced_schedule(probe_steps, probe_max_timestep).num_steps
  acc = {m: StepAccumulator() for m in measures}
  n = len(labels)
  for lo in range(0, n, batch_size):
    ids = np.arange(lo, lo + batch_size)
    lab = labels[np.minimum(ids, n - 1)]
    _, contexts = generate_with_contexts(sampler, lab, key, image_ids=ids, steps=plan.steps,
                                         max_timestep=plan.max_timestep, sampling=sampling)
    real = np.repeat(ids < n, contexts[0].pred_pos.shape[1])
    for ctx in contexts:
      zc, zu, valid = _split_conditions(ctx)
      keep = valid & real
      probe_key = jax.random.fold_in(jax.random.fold_in(key, 1_000_003 + lo), ctx.step.index)
      for m in measures:
        vals = _probe(sampler.state, zc, zu, probe_key, tables, jnp.float32(ctx.step.cfg),
                      jnp.float32(sampling.temperature), graphdef=sampler.graphdef,
                      num_steps=actual, samples=samples, mode=m)
        vals = np.asarray(vals)[keep]
        validation.check_finite_batch(vals, what=f'{m} probe at AR step {ctx.step.index}',
                                      cfg=ctx.step.cfg, temperature=sampling.temperature)
        acc[m].add(ctx.step.index, vals)
    if progress is not None:
      progress(min(lo + batch_size, n))
  return {m: acc[m].summary(m) for m in measures}


# ------------------------------------------------------------------------------------------
def collect_pairs(sampler, labels, key, *, plan, sampling, batch_size: int, progress=None):
  """(z [M, Dd], token [M, C], ar_step [M], image [M]) for every generated token."""
  xs, ys, steps, images = [], [], [], []
  n = len(labels)
  for lo in range(0, n, batch_size):
    ids = np.arange(lo, lo + batch_size)
    lab = labels[np.minimum(ids, n - 1)]
    tokens, contexts = generate_with_contexts(sampler, lab, key, image_ids=ids,
                                              steps=plan.steps, max_timestep=plan.max_timestep,
                                              sampling=sampling)
    for ctx in contexts:
      z = ctx.z[:, 0] if ctx.z.ndim == 4 else ctx.z
      b, q = np.nonzero(ctx.pred_valid & (ids < n)[:, None])
      xs.append(z[b, q])
      ys.append(tokens[b, ctx.pred_pos[b, q]])
      steps.append(np.full(len(b), ctx.step.index, np.int32))
      images.append(ids[b])
    if progress is not None:
      progress(min(lo + batch_size, n))
  return (np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32),
          np.concatenate(steps), np.concatenate(images))


def init_mlp(key, sizes) -> list[dict]:
  params = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    k = jax.random.fold_in(key, i)
    params.append({'w': jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), 'b': jnp.zeros((b,))})
  return params


def mlp_apply(params, x):
  for layer in params[:-1]:
    x = jax.nn.gelu(x @ layer['w'] + layer['b'], approximate=False)
  return x @ params[-1]['w'] + params[-1]['b']


@functools.partial(jax.jit, static_argnames=('steps', 'batch', 'lr'))
def _train(params, x, y, key, *, steps: int, batch: int, lr: float):
  import optax

  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)

  def loss_fn(p, xb, yb):
    return jnp.mean((mlp_apply(p, xb) - yb) ** 2)

  def step(carry, k):
    p, st = carry
    idx = jax.random.randint(k, (batch,), 0, x.shape[0])
    loss, g = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
    upd, st = opt.update(g, st, p)
    return (optax.apply_updates(p, upd), st), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                     jax.random.split(key, steps))
  return params, losses


def predictability(x, y, ar_step, image, *, holdout: float = 0.2, hidden: int = 256,
                   steps: int = 2000, batch: int = 256, lr: float = 1e-3, seed: int = 0) -> dict:
  """Trains an MLP z -> token on the images not held out; held-out error per AR step.

  Inputs and targets are standardised with training statistics; errors are reported in token
  units (mean over the C dimensions): `mse`, `baseline_mse` (predicting the training mean
  token) and `r2` = 1 - SSE / SST within the step.
  """
  rng = np.random.default_rng(seed)
  uniq = np.unique(image)
  test_images = rng.permutation(uniq)[:max(1, int(round(holdout * len(uniq))))]
  test = np.isin(image, test_images)
  if test.all() or not test.any():
    raise ValueError('predictability needs at least 2 images (train and held-out)')
  x_mu, x_sd = x[~test].mean(0), x[~test].std(0) + 1e-6
  y_mu, y_sd = y[~test].mean(0), y[~test].std(0) + 1e-6
  xs, ys = (x - x_mu) / x_sd, (y - y_mu) / y_sd
  key = jax.random.key(seed)
  params = init_mlp(key, (x.shape[1], hidden, hidden, y.shape[1]))
  params, losses = _train(params, jnp.asarray(xs[~test]), jnp.asarray(ys[~test]),
                          jax.random.fold_in(key, 1), steps=steps, batch=batch, lr=lr)
  pred = np.asarray(mlp_apply(params, jnp.asarray(xs[test]))) * y_sd + y_mu
  yt, st = y[test], ar_step[test]
  per_step = []
  for s in np.unique(st):
    m = st == s
    err = ((pred[m] - yt[m]) ** 2).mean(axis=1)
    base = ((y_mu - yt[m]) ** 2).mean(axis=1)
    sst = ((yt[m] - yt[m].mean(0)) ** 2).sum()
    per_step.append({'ar_step': int(s), 'tokens': int(m.sum()), 'mse': float(err.mean()),
                     'mse_sem': float(err.std() / np.sqrt(m.sum())),
                     'baseline_mse': float(base.mean()),
                     'r2': float(1 - ((pred[m] - yt[m]) ** 2).sum() / sst) if sst > 0 else None})
  train_pred = np.asarray(mlp_apply(params, jnp.asarray(xs[~test]))) * y_sd + y_mu
  return {
    'per_step': per_step,
    'train_mse': float(((train_pred - y[~test]) ** 2).mean()),
    'test_mse': float(((pred - yt) ** 2).mean()),
    'final_train_loss': float(losses[-100:].mean()),
    'train_tokens': int((~test).sum()), 'test_tokens': int(test.sum()),
    'train_images': int(len(uniq) - len(test_images)), 'test_images': int(len(test_images)),
    'mlp': {'hidden': hidden, 'layers': 3, 'steps': steps, 'batch': batch, 'lr': lr},
  }


def bin_steps(per_step: list[dict], key: str, bins: int) -> list[dict]:
  """Token-weighted averages of `key` over equal-width bins of AR steps."""
  steps = np.array([r['ar_step'] for r in per_step])
  if bins <= 0 or bins >= len(steps):
    return [{'ar_step_lo': r['ar_step'], 'ar_step_hi': r['ar_step'], 'tokens': r['tokens'],
             key: r[key]} for r in per_step]
  edges = np.linspace(steps.min(), steps.max() + 1, bins + 1)
  out = []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    rows = [r for r in per_step if lo <= r['ar_step'] < hi and r[key] is not None]
    if rows:
      w = np.array([r['tokens'] for r in rows], np.float64)
      out.append({'ar_step_lo': int(rows[0]['ar_step']), 'ar_step_hi': int(rows[-1]['ar_step']),
                  'tokens': int(w.sum()),
                  key: float(np.average([r[key] for r in rows], weights=w))})
  return out
