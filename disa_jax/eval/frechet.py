"""Frechet distance between Gaussians fitted to features (FID and friends).

  d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Computed host-side in float64 with `scipy.linalg.sqrtm`, as pytorch-fid / torch-fidelity /
the ADM evaluator do (including their handling of a slightly complex or singular product).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D] in float64 (N >= 2)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'need features [N >= 2, D], got shape {f.shape}')
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
  """scipy's sqrtm without its deprecated `disp` argument (removed in SciPy 1.18; with it,
  1.17 returns a tuple except for 1x1 inputs). A singular product shows up as non-finite
  entries, which `frechet_distance` handles."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    out = linalg.sqrtm(m)
  return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f'statistics have different shapes: {mu1.shape}/{s1.shape} vs '
                     f'{mu2.shape}/{s2.shape}')
  diff = mu1 - mu2
  covmean = _sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = _sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'imaginary component {np.max(np.abs(covmean.imag))} in sqrtm')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_to_features(features, mu2, sigma2) -> float:
  """Frechet distance between the Gaussian fitted to features [N, D] and (mu2, sigma2).

  For N <= D (fewer images than feature dimensions) the sample covariance S1 = X^T X has rank
  < N, and tr (S1 S2)^{1/2} is computed exactly from the N x N matrix X S2 X^T (same nonzero
  eigenvalues as S1 S2), instead of a D x D square root of a singular product. Otherwise this
  is `frechet_distance(*feature_stats(features), mu2, sigma2)`.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'need features [N >= 2, D], got shape {f.shape}')
  n, d = f.shape
  if n > d:
    return frechet_distance(*feature_stats(f), mu2, sigma2)
  mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  if mu2.shape != (d,) or s2.shape != (d, d):
    raise ValueError(f'statistics have different shapes: ({d},)/({d}, {d}) vs '
                     f'{mu2.shape}/{s2.shape}')
  mu1 = f.mean(axis=0)
  x = (f - mu1) / np.sqrt(n - 1)                # S1 = x^T x
  k = x @ s2 @ x.T
  eig = np.linalg.eigvalsh((k + k.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.sum(x * x) + np.trace(s2) - 2 * tr_covmean)
