"""Host-side plan of a MAR sampling run: AR mask schedule, DiSA steps, jit buckets.

Everything about a run's shapes is known before sampling (LTH14/mar `sample_tokens`):
  m_next(s) = floor(L cos(pi/2 (s+1)/K))  (float64), clamped to [1, m_cur - 1]
  tokens predicted at step s: m_cur - m_next (all remaining at the last step)
  linear CFG scale: 1 + (cfg - 1) (L - m_next) / L,  m_next = the clamped post-step count
so the sampler can choose static shapes up front:

- backbone bucket V_pad: the encoder sees the buffer plus V visible tokens, padded to a
  multiple of `enc_bucket` (padding excluded as attention keys); the decoder's last block
  returns only the `n_query` rows (the largest n_pad of the run) around the predicted tokens.
- head bucket (A, n_pad): A = network evaluations per token (after the DiSA clamp); rows are
  padded within a bucket and buckets are split so that each wastes at most `max_head_waste`
  of its row-steps.
  With `traced_steps` the step count is a traced loop bound instead: one head bucket per n_pad
  (rows grouped over all AR steps), every table padded to the run's largest A (`steps_pad`).

Compilations are bounded by the number of distinct keys; `SamplingPlan.report()` makes the
padding waste visible (FLOPs: `disa_jax.systems.mar.flops`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np

from disa_jax.diffusion.gaussian import spaced_schedule
from disa_jax.systems.mar.model import MARConfig


def mask_schedule(num_iter: int, seq_len: int) -> list[tuple[int, int, int]]:
  """(m_cur, m_next, n_pred) per AR step: masked before, masked after (clamped), predicted."""
  if isinstance(num_iter, bool) or not isinstance(num_iter, int | np.integer):
    raise ValueError(f'num_iter must be an integer, got {num_iter!r}')
  if not 1 <= num_iter <= seq_len:
    raise ValueError(f'num_iter must be in [1, {seq_len}] (one token per step at most '
                     f'{seq_len} steps), got {num_iter}')
  out, m_cur = [], seq_len
  for s in range(num_iter):
    m_next = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (s + 1) / num_iter)))
    m_next = max(1, min(m_cur - 1, m_next))
    n = m_cur if s == num_iter - 1 else m_cur - m_next
    out.append((m_cur, m_next, n))
    m_cur -= n
  return out


def cfg_scale(cfg: float, schedule: str, m_next: int, seq_len: int) -> float:
  if schedule == 'linear':
    return 1.0 + (cfg - 1.0) * (seq_len - m_next) / seq_len
  if schedule == 'constant':
    return float(cfg)
  raise ValueError(f'unknown cfg schedule {schedule!r}; choose linear or constant')


@dataclasses.dataclass(frozen=True)
class ARStep:
  index: int
  m_cur: int           # masked tokens before the step
  m_next: int          # masked tokens after the step (clamped value used by linear CFG)
  n_pred: int          # tokens predicted per image
  n_pad: int           # rows per image in the head / decoder-query bucket
  visible: int         # tokens the encoder sees (besides the buffer)
  visible_pad: int     # encoder bucket length (besides the buffer)
  requested_steps: int
  actual_steps: int    # network evaluations per token
  cfg: float           # guidance scale at this step
  steps_pad: int = 0   # static table length of the head bucket (0: = actual_steps)

  @property
  def head_key(self) -> tuple[int, int]:
    """(static step length, n_pad) of the compiled head this step runs."""
    return (self.steps_pad or self.actual_steps, self.n_pad)


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  seq_len: int
  buffer_size: int
  batch_size: int
  use_cfg: bool
  max_timestep: int | None
  steps: tuple[ARStep, ...]

  @property
  def num_iter(self) -> int:
    return len(self.steps)

  @property
  def n_query(self) -> int:
    """Rows per image the decoder returns at every step (the largest head bucket): the
    backbone is then keyed by the encoder length alone; extra query rows cost ~nothing."""
    return max(s.n_pad for s in self.steps)

  @property
  def backbone_buckets(self) -> list[int]:
    return sorted({s.visible_pad for s in self.steps})

  @property
  def head_buckets(self) -> list[tuple[int, int]]:
    return sorted({s.head_key for s in self.steps})

  def head_token_steps(self, padded: bool = False) -> int:
    """Sum over AR steps of rows x network evaluations, per image, before the x2 of CFG."""
    return sum((s.n_pad if padded else s.n_pred) * s.actual_steps for s in self.steps)

  def head_waste(self) -> float:
    padded = self.head_token_steps(padded=True)
    return 1.0 - self.head_token_steps() / padded

  def encoder_waste(self) -> float:
    useful = sum(self.buffer_size + s.visible for s in self.steps)
    padded = sum(self.buffer_size + s.visible_pad for s in self.steps)
    return 1.0 - useful / padded

  def report(self) -> dict:
    return {
      'num_iter': self.num_iter,
      'steps_requested': [s.requested_steps for s in self.steps],
      'steps_actual': [s.actual_steps for s in self.steps],
      'tokens_per_step': [s.n_pred for s in self.steps],
      'head_token_steps_per_image': self.head_token_steps(),
      'head_token_steps_per_image_padded': self.head_token_steps(padded=True),
      'head_padding_waste': round(self.head_waste(), 4),
      'encoder_padding_waste': round(self.encoder_waste(), 4),
      'backbone_buckets': len(self.backbone_buckets),
      'head_buckets': len(self.head_buckets),
    }


def _pad_to(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple if multiple > 1 else n


def _group_rows(counts: dict[int, int], max_waste: float) -> dict[int, int]:
  """Maps each row count n to its padded size within one step-count bucket.

  `counts[n]` is the weight (token-steps) of AR steps predicting n tokens. Greedy from the
  largest n down: a smaller n joins the current group while the group's waste stays within
  `max_waste`, so every group (hence every bucket and the whole run) wastes at most that.
  """
  mapping, group, top = {}, [], None
  for n in sorted(counts, reverse=True):
    if top is not None:
      cand = group + [n]
      useful = sum(counts[m] * m for m in cand)
      padded = sum(counts[m] * top for m in cand)
      if 1 - useful / padded <= max_waste:
        group = cand
        continue
      mapping.update({m: top for m in group})
    top, group = n, [n]
  mapping.update({m: top for m in group})
  return mapping


def make_plan(
  config: MARConfig,
  *,
  batch_size: int,
  steps,
  max_timestep: int | None,
  cfg: float,
  cfg_schedule: str = 'linear',
  enc_bucket: int = 16,
  max_head_waste: float = 0.05,
  traced_steps: bool = False,
) -> SamplingPlan:
  """Plans a run. `steps` is the requested diffusion-step count per AR step (len = num_iter)."""
  seq = config.seq_len
  steps = list(steps)
  sched = mask_schedule(len(steps), seq)
  if enc_bucket < 1:
    raise ValueError(f'enc_bucket must be >= 1, got {enc_bucket}')
  if not 0.0 <= max_head_waste < 1.0:
    raise ValueError(f'max_head_waste must be in [0, 1), got {max_head_waste}')
  if cfg_schedule not in ('linear', 'constant'):
    raise ValueError(f'unknown cfg schedule {cfg_schedule!r}; choose linear or constant')
  actual = [spaced_schedule(int(t), max_timestep).num_steps for t in steps]

  steps_pad = max(actual) if traced_steps else 0
  group_of = (lambda a: steps_pad) if traced_steps else (lambda a: a)  # noqa: E731
  by_steps: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
  for (_, _, n), a in zip(sched, actual, strict=True):
    by_steps[group_of(a)][n] += a
  pad_of = {g: _group_rows(rows, max_head_waste) for g, rows in by_steps.items()}

  out = []
  for s, ((m_cur, m_next, n), t, a) in enumerate(zip(sched, steps, actual, strict=True)):
    visible = seq - m_cur
    out.append(ARStep(
      index=s, m_cur=m_cur, m_next=m_next, n_pred=n, n_pad=pad_of[group_of(a)][n],
      visible=visible, visible_pad=min(_pad_to(visible, enc_bucket), seq),
      requested_steps=int(t), actual_steps=a,
      cfg=cfg_scale(cfg, cfg_schedule, m_next, seq), steps_pad=steps_pad))
  return SamplingPlan(seq_len=seq, buffer_size=config.buffer_size, batch_size=batch_size,
                      use_cfg=cfg != 1.0, max_timestep=max_timestep, steps=tuple(out))
