"""Figures of the evidence and speed-quality measurements (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402


def _save(fig, path: str) -> str:
  tmp = os.path.join(os.path.dirname(path) or '.', f'.{os.path.basename(path)}.tmp.png')
  fig.savefig(tmp, dpi=130, bbox_inches='tight')
  plt.close(fig)
  os.replace(tmp, path)
  return path


def per_step(rows: list[dict], key: str, *, ylabel: str, title: str, path: str,
             note: str = '') -> str:
  """Mean (+- standard error) of `key` against AR step."""
  x = [r['ar_step'] + 1 for r in rows]
  y = [r[key] for r in rows]
  err = [r.get(f'{key}_sem', 0.0) for r in rows]
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  ax.errorbar(x, y, yerr=err, marker='o', ms=3, lw=1.5, capsize=2)
  ax.set_xlabel('AR step')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if note:
    fig.text(0.01, -0.02, note, fontsize=7, va='top')
  return _save(fig, path)


def predictability(rows: list[dict], *, title: str, path: str, note: str = '') -> str:
  """Held-out MLP error and the predict-the-mean baseline against AR step."""
  x = [r['ar_step'] + 1 for r in rows]
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  ax.errorbar(x, [r['mse'] for r in rows], yerr=[r['mse_sem'] for r in rows], marker='o', ms=3,
              lw=1.5, capsize=2, label='MLP(z) held-out MSE')
  ax.plot(x, [r['baseline_mse'] for r in rows], ls='--', color='gray', label='mean-token MSE')
  ax.set_xlabel('AR step')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel('MSE per token dimension')
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if note:
    fig.text(0.01, -0.02, note, fontsize=7, va='top')
  return _save(fig, path)


def speed_quality(runs: list[dict], *, metric_name: str, higher_is_better: bool, title: str,
                  path: str, note: str = '') -> str:
  """Two panels: quality vs measured generation time per image, and vs counted head network
  evaluations per image (hardware independent)."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  families = {}
  for r in runs:
    families.setdefault(r['family'], []).append(r)
  markers = {'MAR (constant steps)': 'o', 'DiSA linear': 's', 'DiSA cosine': '^',
             'DiSA two-stage': 'D'}
  for ax, xkey, xlabel in ((axes[0], 'generate_s_per_image', 'generation time per image (s)'),
                           (axes[1], 'head_evals_per_image',
                            'head network evaluations per image')):
    for fam, rows in families.items():
      rows = sorted(rows, key=lambda r: r[xkey])
      xs, ys = [r[xkey] for r in rows], [r['quality'] for r in rows]
      swept = rows[0]['strategy'] == 'constant'    # a sweep of step counts: draw its curve
      ax.plot(xs, ys, '-' if swept else '', marker=markers.get(fam, 'x'), ms=6, label=fam)
      for r in rows:
        if swept:
          ax.annotate(str(r['upper_steps']), (r[xkey], r['quality']), fontsize=7,
                      xytext=(3, 3), textcoords='offset points')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f'{metric_name} ({"higher" if higher_is_better else "lower"} is better)')
    ax.grid(alpha=0.3)
  axes[1].set_xscale('log')
  axes[1].xaxis.set_minor_formatter(NullFormatter())
  qs = [r['quality'] for r in runs if r['quality'] > 0]
  if qs and max(qs) > 20 * min(qs):          # e.g. a failing baseline next to working runs
    for ax in axes:
      ax.set_yscale('log')
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  if note:
    fig.text(0.01, -0.02, note, fontsize=7, va='top')
  return _save(fig, path)
