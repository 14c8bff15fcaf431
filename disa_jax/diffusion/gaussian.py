"""Host-side Gaussian diffusion tables: cosine schedule, respacing, DiSA timestep clamp.

Everything here is float64 numpy, computed once on the host, exactly as the official MAR
code (LTH14/mar `diffusion/`, itself IDDPM/DiT): 1000-step cosine betas, `space_timesteps`
with an accumulated float stride and Python's half-to-even `round`, and `SpacedDiffusion`'s
recomputation of betas from the kept timesteps. DiSA (Qinyu-Allen-Zhao/DiSA) additionally
clamps every kept timestep to `max_timestep` (950) before de-duplication.

Sampling code gathers float32 copies of these tables (`SpacedSchedule.sampling_tables`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DISA_MAX_TIMESTEP = 950


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
  """Cosine betas (Nichol & Dhariwal, s=0.008), float64 [num_timesteps]."""

  def alpha_bar(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [
    min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
    for i in range(num_timesteps)
  ]
  return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
  """Timesteps kept when respacing, as the official `space_timesteps`.

  `section_counts` is an int, a comma-separated string ("100", "10,15,20") or a list of ints.
  Within each equal-size section the kept steps are round(c) for an accumulated float cursor c
  (Python round: half to even).
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  elif isinstance(section_counts, str):
    section_counts = [int(x) for x in section_counts.split(',')]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if count < 1 or size < count:
      raise ValueError(f'cannot divide a section of {size} timesteps into {count} steps')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cursor = 0.0
    for _ in range(count):
      kept.append(start + round(cursor))
      cursor += stride
    start += size
  return set(kept)


def respaced_timesteps(
  num_steps: int, max_timestep: int | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
  """Original timesteps kept for `num_steps` sampling steps, ascending (int64).

  With `max_timestep` (DiSA uses 950) every kept t becomes min(t, max_timestep) before
  de-duplication, so fewer steps than requested may remain (T=50 -> 48 under 950).
  """
  num_steps = _check_steps(num_steps, num_timesteps)
  kept = space_timesteps(num_timesteps, num_steps)
  if max_timestep is not None:
    if not 0 <= max_timestep:
      raise ValueError(f'max_timestep must be >= 0, got {max_timestep}')
    kept = {min(t, int(max_timestep)) for t in kept}
  return np.array(sorted(kept), dtype=np.int64)


def _check_steps(num_steps, num_timesteps):
  if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
    raise TypeError(f'number of diffusion steps must be an int, got {num_steps!r}')
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(
      f'number of diffusion steps must be in [1, {num_timesteps}], got {num_steps}'
    )
  return int(num_steps)


@dataclasses.dataclass(frozen=True)
class DiffusionTables:
  """Closed-form coefficients of a discrete Gaussian diffusion, float64 [N] each.

  Built from betas exactly as the official `GaussianDiffusion.__init__`.
  """

  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @classmethod
  def from_betas(cls, betas) -> DiffusionTables:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError('betas must be a 1-D array with values in (0, 1]')
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    if len(post_var) > 1:
      post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    else:  # Official code leaves this empty; a 1-step chain never adds noise anyway.
      post_logvar = np.log(np.maximum(post_var, 1e-20))
    return cls(
      betas=betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_logvar,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )

  def __len__(self):
    return len(self.betas)


@functools.cache
def base_tables(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DiffusionTables:
  """Tables of the full (training) cosine diffusion."""
  return DiffusionTables.from_betas(cosine_betas(num_timesteps))


@dataclasses.dataclass(frozen=True)
class SpacedSchedule:
  """A respaced sampling chain: kept original timesteps and the recomputed tables.

  `timesteps[k]` is the original timestep the network sees at respaced index k (the official
  `timestep_map`); `tables` are rebuilt from beta'_k = 1 - abar[t_k] / abar[t_{k-1}].
  """

  requested_steps: int
  max_timestep: int | None
  timesteps: np.ndarray
  tables: DiffusionTables

  @property
  def num_steps(self) -> int:
    """Network evaluations per token (after clamp and de-duplication)."""
    return len(self.timesteps)

  def sampling_tables(self) -> dict[str, np.ndarray]:
    """float32 per-iteration coefficients in *sampling order* (k = N-1 ... 0).

    Keys: t (original timestep, float), sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2,
    log_beta (max log-variance), post_logvar (min log-variance), noise_mask (0 at k=0).
    """
    tb = self.tables
    rev = slice(None, None, -1)
    out = {
      't': self.timesteps[rev].astype(np.float32),
      'sqrt_recip_ac': tb.sqrt_recip_alphas_cumprod[rev],
      'sqrt_recipm1_ac': tb.sqrt_recipm1_alphas_cumprod[rev],
      'coef1': tb.posterior_mean_coef1[rev],
      'coef2': tb.posterior_mean_coef2[rev],
      'log_beta': np.log(tb.betas)[rev],
      'post_logvar': tb.posterior_log_variance_clipped[rev],
      'noise_mask': (np.arange(self.num_steps)[rev] != 0).astype(np.float64),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


@functools.cache
def spaced_schedule(
  num_steps: int, max_timestep: int | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> SpacedSchedule:
  """The official `SpacedDiffusion` for `num_steps` (DiSA: with `max_timestep`=950)."""
  kept = respaced_timesteps(num_steps, max_timestep, num_timesteps)
  base = base_tables(num_timesteps)
  last, new_betas = 1.0, []
  for t in kept:
    ac = base.alphas_cumprod[t]
    new_betas.append(1 - ac / last)
    last = ac
  return SpacedSchedule(
    requested_steps=int(num_steps),
    max_timestep=None if max_timestep is None else int(max_timestep),
    timesteps=kept,
    tables=DiffusionTables.from_betas(new_betas),
  )
