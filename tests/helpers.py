"""Small shared helpers for the tests."""

import numpy as np
from flax import nnx

from disa_jax.config import TINY_MODEL
from disa_jax.systems.mar.model import MAR, MARConfig

# Random-weight scale of the PyTorch-reference parity tests: large enough that tanh-GELU or a
# wrong LayerNorm eps misses PARITY_TOL = 1e-5 by > 10x (tests/test_parity_margins.py).
PARITY_WEIGHT_SCALE = 0.1

# Bound of `token_parity` (whole sampled token grids, every noise draw injected). fp32
# reordering error grows through the CFG-amplified, clamped steps, so it depends on the noise:
# over 60 noise seeds of the (disa, 8, 2.5, linear, 0.9) case on the per-step head path the max
# relative error has median 4.2e-6 and max 2.3e-5 (docs/testing.md, "Tolerance margins"); the
# seed the test uses gave 9.8e-6 against the old 1e-5. One forward (z, head) stays at
# PARITY_TOL = 1e-5, where the approximations miss by > 10x.
TOKEN_PARITY_TOL = 5e-5


def tiny_model(seed=0, **overrides):
  """A 16-token MAR with *non-zero* random parameters everywhere (the official init zeroes
  the head's adaLN and output layers, which would make the head output identically zero)."""
  cfg = MARConfig.from_dict({**TINY_MODEL, **overrides})
  model = MAR(cfg, rngs=nnx.Rngs(seed))
  randomize(model, seed)
  return model


def randomize(model, seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    name = '.'.join(str(p) for p in path)
    noise = rng.standard_normal(var.shape).astype(np.float32) * scale
    var[...] = 1.0 + noise if name.endswith('scale') else noise
  nnx.update(model, state)
  return model


def max_rel_error(a, b) -> float:
  """max |a - b| / max |b|: float32 rounding differences (different matmul blocking for a
  different batch shape or device count) stay ~1e-6 of the tokens' scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# (preset, num_iter, cfg, cfg_schedule, temperature) of the token-parity tests.
TOKEN_PARITY_CASES = [
  ('disa', 8, 2.5, 'linear', 0.9),     # DiSA: annealed steps + 950 clamp, linear CFG
  ('mar', 4, 1.0, 'linear', 1.0),      # original MAR schedule, no CFG
  ('disa', 16, 3.0, 'constant', 1.0),  # one token per step at the end, constant CFG
]


def token_parity(model, torch_model, *, preset, k, cfg, schedule, temp, batch=3,
                 modulation_budget=None, unconditional=False, seed=None) -> float:
  """Max relative difference between the tokens sampled by the JAX `Sampler` (from `model`,
  matmul precision 'highest') and by the PyTorch reference `sample_tokens` (from
  `torch_model`, same weights), with the generation orders and all noise injected into both.
  `modulation_budget` (bytes; 0 = the head's per-step path) goes to the `Sampler`.
  `unconditional`: label -1 for every image in JAX, the official `labels=None` (fake_latent
  class vector) in the reference. `seed` draws the orders and noise (default: `k`)."""
  import jax

  from disa_jax.schedules import resolve_steps
  from disa_jax.systems.mar.sampling import Sampler
  from reference import mar as tr

  sp = resolve_steps(num_iter=k, preset=preset, upper=30 if preset == 'disa' else 20, lower=4)
  rng = np.random.default_rng(k if seed is None else seed)
  seq = model.config.seq_len
  orders = np.stack([rng.permutation(seq) for _ in range(batch)])
  labels = np.arange(batch)       # includes class 0 (a class, not the unconditional vector)
  store = {}

  def noise_source(step, n, num_steps):
    x_t = rng.standard_normal((n, 16)).astype(np.float32)
    eps = rng.standard_normal((num_steps, (2 if cfg != 1.0 else 1) * n, 16)).astype(np.float32)
    store[step] = (x_t, eps[:, :n])
    return x_t, iter(eps)

  if unconditional:
    labels = np.full((batch,), -1)
  ref = tr.sample_tokens(torch_model, batch, num_iter=k, cfg=cfg, cfg_schedule=schedule,
                         labels=None if unconditional else labels, temperature=temp,
                         steps=list(sp.steps), clip=sp.max_timestep, orders=orders,
                         noise_source=noise_source).numpy()
  budget = {} if modulation_budget is None else dict(modulation_budget=modulation_budget)
  out = Sampler(model, matmul_precision='highest', enc_bucket=4, **budget).generate(
    labels, jax.random.key(0), steps=sp.steps, max_timestep=sp.max_timestep, cfg=cfg,
    cfg_schedule=schedule, temperature=temp, orders=orders, noise=lambda s, n: store[s])
  return max_rel_error(out, ref)


def official_keys(data_dir, section: str) -> dict[str, tuple[int, ...]]:
  """{key: torch shape} of one section of tests/data/mar_state_dict_keys.txt ('mar_base',
  'mar_large', 'mar_huge' or 'KL-16')."""
  keys, on = {}, False
  for line in (data_dir / 'mar_state_dict_keys.txt').read_text().splitlines():
    if line.startswith('## '):
      on = line.startswith(f'## {section} ')
      continue
    if on and '\t' in line:
      k, shape = line.split('\t')
      keys[k] = tuple(int(x) for x in shape.strip('()').split(',') if x.strip())
  return keys


# A reduced KL-16 VAE for CPU tests: half the width, every block type of the official one
# (resnet blocks with and without nin_shortcut, encoder attention at the last level, mid
# attention, asymmetric-pad downsampling, nearest upsampling), same 16x downsampling.
SMALL_VAE = dict(ch=64)


def torch_vae(cfg, seed=0, *, logvar_bias=None):
  """The reference VAE (`TorchAutoencoderKL`) with non-zero random weights.

  `logvar_bias` (a float) is added to the first quarter of the logvar channels and
  subtracted from the second quarter, so the [-30, 20] clamp is exercised on both sides (the
  other half stays unclamped)."""
  import torch

  from reference.mar import randomize_
  from reference.vae import TorchAutoencoderKL

  tv = randomize_(TorchAutoencoderKL(cfg).eval(), seed=seed)
  if logvar_bias is not None:
    z, q = cfg.embed_dim, cfg.embed_dim // 4
    with torch.no_grad():
      tv.quant_conv.bias[z:z + q] += logvar_bias
      tv.quant_conv.bias[z + q:z + 2 * q] -= logvar_bias
  return tv
