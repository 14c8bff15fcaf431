"""Speed-quality curves: MAR with several constant step counts vs DiSA schedules (the paper's
trade-off figure), on one model, one label set and one seed.

Every run generates the same images (labels, seed) with its own step schedule; generation time
(compile excluded), the counted head network evaluations per image and the quality metric
(`inception` FID or the bundled model's `digits` score) are recorded.
"""

from __future__ import annotations

import numpy as np

from disa_jax.engine import runner
from disa_jax.eval import pipeline
from disa_jax.schedules import RunSpec, RunSpecError  # noqa: F401  (re-exported)


def default_runs(num_iter: int, upper: int = 50, lower: int = 5,
                 mar_steps=(5, 10, 25, 50, 100)) -> list[RunSpec]:
  """MAR at several constant step counts, DiSA linear / cosine / two-stage upper -> lower."""
  runs = [RunSpec(f'mar{t}', 'mar', num_iter, t, t, 'constant') for t in mar_steps]
  runs += [RunSpec(f'disa-{s}', 'disa', num_iter, upper, lower, s)
           for s in ('linear', 'cosine', 'two-stage')]
  return runs


def speed_quality(sampler, decoder, labels, *, runs, sampling, key, batch_size: int, metric,
                  warmup: bool = True, progress=None) -> list[dict]:
  """Generates `labels` once per run and scores them; returns one record per run. With
  `warmup`, one untimed batch per run precedes the timed generation."""
  out = []
  for spec in runs:
    plan = spec.step_plan()
    if warmup:     # first executions of fresh buckets carry one-off costs: keep them untimed
      first = labels[np.minimum(np.arange(batch_size), len(labels) - 1)]
      runner.generate_checked(sampler, first, key, steps=plan.steps,
                              max_timestep=plan.max_timestep, cfg=sampling.cfg,
                              cfg_schedule=sampling.cfg_schedule,
                              temperature=sampling.temperature)
    outcome = pipeline.run(sampler, decoder, labels, plan=plan, sampling=sampling, key=key,
                           batch_size=batch_size, metric=metric)
    p = sampler.plan(batch_size, steps=plan.steps, max_timestep=plan.max_timestep,
                     cfg=sampling.cfg, cfg_schedule=sampling.cfg_schedule)
    rec = {
      'label': spec.label, 'family': spec.family, 'preset': spec.preset,
      'strategy': spec.strategy, 'num_iter': spec.num_iter, 'upper_steps': spec.upper,
      'lower_steps': spec.lower, 'max_timestep': plan.max_timestep,
      'steps_actual': [s.actual_steps for s in p.steps],
      'head_evals_per_image': p.head_token_steps(),
      'generate_s': outcome.timing['generate_s'],
      'generate_s_per_image': outcome.timing['generate_s_per_image'],
      'decode_s': outcome.timing['decode_s'],
      'metrics': outcome.metrics,
    }
    if metric is not None:
      rec['quality'] = outcome.metrics[metric.primary]
    out.append(rec)
    if progress is not None:
      progress(rec)
  return out
