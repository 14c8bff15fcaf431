"""Inception metrics: FID, sFID, Inception Score and precision/recall against a reference.

- FID: Frechet distance of the 2048-d pool features to the reference `mu`/`sigma` (host float64,
  `disa_jax.eval.frechet`), as torch-fidelity with `fid_statistics_file` (MAR's protocol) and
  the ADM evaluator.
- sFID: the same on the 2023-d spatial features, when the reference has `mu_s`/`sigma_s`.
- IS: torch-fidelity `isc_features_to_metric` on `logits_unbiased`: rows shuffled with
  `RandomState(2020)`, float64 softmax, 10 splits `[i N // 10, (i + 1) N // 10)`,
  exp(mean KL(p(y|x) || p(y))) per split; mean and std over splits.
- Precision / recall: the ADM evaluator's k-NN manifolds (k = 3) on pool features: the radius
  of a point is the squared distance to its 3rd nearest neighbour in its own set (itself
  excluded); precision = fraction of samples inside some reference ball, recall = fraction of
  reference points inside some sample ball. Needs reference images (`arr_0`) or features.
  Distances are computed in float32 (the ADM evaluator tries float16 first).

Reference files (`ReferenceStats.load`): ADM `VIRTUAL_imagenet256_labeled.npz` (mu, sigma,
mu_s, sigma_s, arr_0 uint8 images), MAR's `fid_stats/adm_in256_stats.npz` (mu, sigma), and
`ref_mu`/`ref_sigma` (meanflow); an optional `pool` array [N, 2048] holds precomputed
reference features for precision/recall.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile

import numpy as np

from disa_jax.errors import UserError
from disa_jax.eval.frechet import frechet_distance_to_features
from disa_jax.eval.inception import NUM_LOGITS, POOL_DIM, SPATIAL_DIM


class ReferenceError(UserError):
  """A reference statistics file that cannot be used; the message says why."""


@dataclasses.dataclass
class ReferenceStats:
  path: str
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool: np.ndarray | None = None          # reference pool features [N, 2048]
  has_images: bool = False                # `arr_0` present (loaded on demand)

  @classmethod
  def load(cls, path) -> ReferenceStats:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
      raise ReferenceError(f'reference statistics file {path} does not exist')
    with open(path, 'rb') as f:
      head = f.read(4)
    if not head.startswith(b'PK'):      # np.savez writes a zip archive; anything else is refused
      raise ReferenceError(f'{path} is not a .npz reference statistics file (not a zip '
                           'archive); pass the .npz with mu/sigma (e.g. ADM '
                           'VIRTUAL_imagenet256_labeled.npz)')
    try:
      data = np.load(path, allow_pickle=False)
      keys = set(data.files)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      reason = 'it holds pickled objects' if 'pickle' in str(e).lower() else e.__class__.__name__
      raise ReferenceError(f'{path} is not a valid .npz reference statistics file ({reason}); '
                           'pass the .npz with mu/sigma arrays') from None
    mu_key, sigma_key = ('mu', 'sigma') if 'mu' in keys else ('ref_mu', 'ref_sigma')
    if mu_key not in keys or sigma_key not in keys:
      raise ReferenceError(
        f'{path} has no FID statistics (keys {sorted(keys)}); expected mu/sigma as in ADM '
        "VIRTUAL_imagenet256_labeled.npz or MAR's fid_stats/adm_in256_stats.npz")
    ref = cls(path, _stat(data, mu_key, path, (POOL_DIM,)),
              _covariance(_stat(data, sigma_key, path, (POOL_DIM, POOL_DIM)), sigma_key, path))
    if 'mu_s' in keys and 'sigma_s' in keys:
      ref.mu_s = _stat(data, 'mu_s', path, (SPATIAL_DIM,))
      ref.sigma_s = _covariance(_stat(data, 'sigma_s', path, (SPATIAL_DIM, SPATIAL_DIM)),
                                'sigma_s', path)
    if 'pool' in keys:
      ref.pool = _stat(data, 'pool', path, (None, POOL_DIM)).astype(np.float32)
    if 'arr_0' in keys:
      ref.has_images = True
    return ref

  def images(self) -> np.ndarray:
    """The reference batch `arr_0` (uint8 [N, H, W, 3])."""
    arr = np.load(self.path, allow_pickle=False)['arr_0']
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
      raise ReferenceError(f'{self.path}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} '
                           f'{arr.shape}')
    return arr


def _covariance(sigma: np.ndarray, key: str, path: str) -> np.ndarray:
  """`sigma` if it is a covariance matrix (symmetric, positive semi-definite up to rounding:
  eigenvalues >= -1e-6 * the largest), else a `ReferenceError`. A matrix that is not one
  would give a meaningless (even negative or complex) Frechet distance."""
  scale = max(float(np.max(np.abs(sigma))), 1e-300)
  if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * scale):
    raise ReferenceError(f'{path}: {key} is not symmetric, so it is not a covariance matrix; '
                         'the reference statistics are corrupt (recompute or download them)')
  eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
  if eig[0] < -1e-6 * max(abs(eig[-1]), 1e-300):
    raise ReferenceError(f'{path}: {key} is not positive semi-definite (smallest eigenvalue '
                         f'{eig[0]:.3g}, largest {eig[-1]:.3g}), so it is not a covariance '
                         'matrix; the reference statistics are corrupt (recompute them)')
  return sigma


def _stat(data, key, path, shape) -> np.ndarray:
  try:
    arr = np.asarray(data[key], np.float64)
  except (ValueError, TypeError, OSError, zipfile.BadZipFile) as e:
    reason = 'pickled objects' if 'pickle' in str(e).lower() else e.__class__.__name__
    raise ReferenceError(f'{path}: {key} cannot be read as a numeric array ({reason})') from None
  if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
    want = 'x'.join('N' if s is None else str(s) for s in shape)
    raise ReferenceError(f'{path}: {key} has shape {arr.shape}, expected [{want}] (statistics '
                         'of the 2015-12-05 FID Inception)')
  if not np.isfinite(arr).all():
    raise ReferenceError(f'{path}: {key} contains non-finite values')
  return arr


# ------------------------------------------------------------------------------------------
def inception_score(logits, splits: int = 10, *, shuffle: bool = True,
                    seed: int = 2020) -> tuple[float, float]:
  """(mean, std) of the Inception Score of logits [N, K] (torch-fidelity semantics)."""
  x = np.asarray(logits, np.float64)
  n = len(x)
  if n < splits:
    raise ValueError(f'the Inception Score needs at least {splits} images (one per split), got '
                     f'{n}')
  if shuffle:
    x = x[np.random.RandomState(seed).permutation(n)]
  log_p = x - x.max(axis=1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    q = p[lo:hi].mean(axis=0, keepdims=True)
    kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
  """Squared Euclidean distances [len(a), len(b)] in float32 (ADM `_batch_pairwise_distances`)."""
  import jax.numpy as jnp

  na = jnp.sum(a * a, axis=1)[:, None]
  nb = jnp.sum(b * b, axis=1)[None, :]
  return jnp.maximum(na - 2 * jnp.dot(a, b.T, precision='highest') + nb, 0.0)


@functools.cache
def _jitted():
  import jax
  import jax.numpy as jnp

  kth = jax.jit(lambda rows, ref, k: -jax.lax.top_k(-_sq_dists(rows, ref), k + 1)[0][:, k],
                static_argnums=2)
  covered = jax.jit(lambda rows, centres, radii: jnp.any(
    _sq_dists(rows, centres) <= radii[None, :], axis=1))
  return kth, covered


def _row_blocks(fn, rows, *args, block: int):
  """fn(row block, *args) over fixed-size row blocks (the last one zero-padded)."""
  rows = np.asarray(rows, np.float32)
  out = []
  for i in range(0, len(rows), block):
    chunk = rows[i:i + block]
    real = len(chunk)
    if real < block and len(rows) > block:
      chunk = np.concatenate([chunk, np.zeros((block - real, rows.shape[1]), np.float32)])
    out.append(np.asarray(fn(chunk, *args))[:real])
  return np.concatenate(out)


def manifold_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row (the row itself is the 0-th)."""
  import jax.numpy as jnp

  if len(features) <= k:
    raise ValueError(f'precision/recall with k={k} needs more than {k} feature vectors per '
                     f'set, got {len(features)}')
  kth, _ = _jitted()
  ref = jnp.asarray(features, jnp.float32)
  return _row_blocks(kth, features, ref, k, block=block)


def _covered(points, centres, radii, block: int = 1024) -> np.ndarray:
  """For each point: is it within the radius of at least one centre (dist <= radius)?"""
  import jax.numpy as jnp

  _, covered = _jitted()
  return _row_blocks(covered, points, jnp.asarray(centres, jnp.float32),
                     jnp.asarray(radii, jnp.float32), block=block)


def precision_recall(ref_features, sample_features, k: int = 3) -> tuple[float, float]:
  """ADM-evaluator precision and recall of samples against references (k-NN manifolds)."""
  r_ref = manifold_radii(ref_features, k)
  r_smp = manifold_radii(sample_features, k)
  precision = _covered(sample_features, ref_features, r_ref).mean()
  recall = _covered(ref_features, sample_features, r_smp).mean()
  return float(precision), float(recall)


# ------------------------------------------------------------------------------------------
class InceptionQuality:
  """FID (primary, lower is better), IS, and, when the reference allows, sFID and
  precision/recall, with the FID Inception converted by `disa-convert inception`.

  Streaming use (50k images never held at once): `features(images)` per batch, concatenate,
  then `evaluate_features(features)`. `evaluate(images, labels)` does both.
  """

  name = 'inception'
  primary = 'fid'
  higher_is_better = False
  streaming = True

  def __init__(self, inception: str, ref_stats: str, *, batch_size: int | None = None,
               splits: int = 10, precision_recall: bool = True, k: int = 3,
               ref_features_cache: str | None = None):
    from disa_jax.eval.inception import InceptionExtractor, default_batch_size, load_inception

    if not inception:
      raise ValueError('the inception metric needs --inception DIR (convert the weights once '
                       'with `disa-convert inception --torch-checkpoint '
                       'pt_inception-2015-12-05-6726825d.pth --out DIR`)')
    if not ref_stats:
      raise ValueError('the inception metric needs --ref_stats FILE (e.g. ADM '
                       "VIRTUAL_imagenet256_labeled.npz or MAR's fid_stats/adm_in256_stats.npz)")
    self.ref = ReferenceStats.load(ref_stats)
    self.extractor = InceptionExtractor(load_inception(inception),
                                        batch_size=batch_size or default_batch_size())
    self.splits, self.k = splits, k
    self.want_pr = precision_recall
    self.ref_features_cache = ref_features_cache

  def features(self, images) -> dict[str, np.ndarray]:
    return self.extractor(images)

  def reference_pool(self) -> np.ndarray | None:
    """Reference pool features for precision/recall (from the file, a cache, or arr_0)."""
    if self.ref.pool is not None:
      return self.ref.pool
    cache = self.ref_features_cache
    if cache and os.path.exists(cache):
      return np.load(cache)['pool']
    if not self.ref.has_images:
      return None
    pool = self.extractor(self.ref.images())['pool']
    if cache:
      tmp = f'{cache}.tmp.npz'
      np.savez(tmp, pool=pool)
      os.replace(tmp, cache)
    self.ref.pool = pool
    return pool

  def evaluate_features(self, feats: dict[str, np.ndarray], labels=None) -> dict[str, float]:
    del labels
    pool = np.asarray(feats['pool'])
    if pool.ndim != 2 or pool.shape[1] != POOL_DIM or len(pool) < 2:
      raise ValueError(f'FID needs pool features [N >= 2, {POOL_DIM}], got {pool.shape}')
    out = {'fid': frechet_distance_to_features(pool, self.ref.mu, self.ref.sigma),
           'num_images': int(len(pool))}
    logits = np.asarray(feats['logits_unbiased'])
    assert logits.shape[1] == NUM_LOGITS
    if len(logits) >= self.splits:
      out['inception_score'], out['inception_score_std'] = inception_score(logits, self.splits)
    if self.ref.mu_s is not None:
      out['sfid'] = frechet_distance_to_features(feats['spatial'], self.ref.mu_s,
                                                 self.ref.sigma_s)
    if self.want_pr and len(pool) > self.k:
      ref_pool = self.reference_pool()
      if ref_pool is not None and len(ref_pool) > self.k:
        out['precision'], out['recall'] = precision_recall(ref_pool, pool, self.k)
    return out

  def evaluate(self, images, labels=None) -> dict[str, float]:
    return self.evaluate_features(self.features(images), labels)
