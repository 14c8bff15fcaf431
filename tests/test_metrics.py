"""Frechet distance, Inception Score, precision/recall and reference-statistics files."""

import numpy as np
import pytest
from scipy import linalg

from disa_jax.eval.frechet import feature_stats, frechet_distance
from disa_jax.eval.metrics import (
  ReferenceError,
  ReferenceStats,
  inception_score,
  manifold_radii,
  precision_recall,
)


def _spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_closed_form_gaussians():
  # 1-D: d^2 = (m1 - m2)^2 + (s1 - s2)^2
  assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)
  # diagonal covariances: sum (m1 - m2)^2 + sum (sqrt a - sqrt b)^2
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
  m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
  want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-10)
  # same covariance: only the mean term remains
  s = _spd(rng, 5)
  assert frechet_distance(m1[:5], s, m2[:5], s) == pytest.approx(np.sum((m1 - m2)[:5] ** 2),
                                                                 rel=1e-8, abs=1e-8)


def test_frechet_matches_scipy_and_eigenvalue_form():
  rng = np.random.default_rng(1)
  s1, s2 = _spd(rng, 16), _spd(rng, 16)
  m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
  got = frechet_distance(m1, s1, m2, s2)
  scipy_ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
  # torch-fidelity: tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2
  eig = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real)
  eig_ref = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * eig
  assert got == pytest.approx(scipy_ref, rel=1e-10)
  assert got == pytest.approx(eig_ref, rel=1e-8)
  assert frechet_distance(m2, s2, m1, s1) == pytest.approx(got, rel=1e-8)     # symmetric


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
  rng = np.random.default_rng(2)
  f = rng.standard_normal((400, 32)).astype(np.float32)
  mu, sigma = feature_stats(f)
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  mu2, sigma2 = feature_stats(f + 0.5)
  assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(32 * 0.25, rel=1e-6)
  with pytest.raises(ValueError, match='different shapes'):
    frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_inception_score_known_values():
  k = 1008
  uniform = np.zeros((100, k))
  assert inception_score(uniform)[0] == pytest.approx(1.0, rel=1e-12)
  # confident predictions, 20 classes evenly spread over every split -> IS = 20
  onehot = np.full((1000, k), -50.0)
  onehot[np.arange(1000), np.arange(1000) % 20] = 50.0
  mean, std = inception_score(onehot, shuffle=False)
  assert mean == pytest.approx(20.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  shuffled, shuffled_std = inception_score(onehot)           # RandomState(2020) shuffling
  assert 15 < shuffled < 20 and shuffled_std > 0
  with pytest.raises(ValueError, match='at least 10 images'):
    inception_score(onehot[:5])


def test_inception_score_matches_torch_fidelity_formula():
  torch = pytest.importorskip('torch')
  logits = np.random.default_rng(3).standard_normal((250, 1008)) * 3
  # torch-fidelity isc_features_to_metric, written out
  f = torch.from_numpy(logits[np.random.RandomState(2020).permutation(250)]).double()
  p, log_p = f.softmax(dim=1), f.log_softmax(dim=1)
  scores = []
  for i in range(10):
    pc, lc = p[i * 250 // 10:(i + 1) * 250 // 10], log_p[i * 250 // 10:(i + 1) * 250 // 10]
    q = pc.mean(dim=0, keepdim=True)
    scores.append((pc * (lc - q.log())).sum(dim=1).mean().exp().item())
  mean, std = inception_score(logits.astype(np.float32))
  assert mean == pytest.approx(np.mean(scores), rel=1e-6)
  assert std == pytest.approx(np.std(scores), rel=1e-5)


def test_manifold_radii_match_brute_force():
  f = np.random.default_rng(4).standard_normal((37, 5)).astype(np.float32)
  d = ((f[:, None] - f[None]) ** 2).sum(-1)
  want = np.sort(d, axis=1)[:, 3]                            # index 0 is the point itself
  np.testing.assert_allclose(manifold_radii(f, k=3, block=16), want, rtol=1e-4, atol=1e-5)


def test_precision_recall_sanity():
  rng = np.random.default_rng(5)
  ref = rng.standard_normal((300, 8)).astype(np.float32)
  assert precision_recall(ref, ref) == (1.0, 1.0)
  far = precision_recall(ref, ref + 100.0)
  assert far == (0.0, 0.0)
  # mode collapse: samples near a few reference points -> precise but poor recall
  collapsed = ref[:5].repeat(60, axis=0) + 0.01 * rng.standard_normal((300, 8)).astype(np.float32)
  p, r = precision_recall(ref, collapsed)
  assert p > 0.95 and r < 0.2
  same = precision_recall(ref, rng.standard_normal((300, 8)).astype(np.float32))
  assert 0.5 < same[0] <= 1 and 0.5 < same[1] <= 1


def test_reference_files_both_formats_and_errors(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = rng.standard_normal(2048), np.eye(2048)
  np.savez(tmp_path / 'mar.npz', mu=mu, sigma=sigma)
  ref = ReferenceStats.load(tmp_path / 'mar.npz')
  assert ref.mu_s is None and not ref.has_images and ref.pool is None
  np.testing.assert_array_equal(ref.mu, mu)
  imgs = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  np.savez(tmp_path / 'adm.npz', mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023),
           arr_0=imgs)
  adm = ReferenceStats.load(tmp_path / 'adm.npz')
  assert adm.mu_s.shape == (2023,) and adm.has_images
  np.testing.assert_array_equal(adm.images(), imgs)
  np.savez(tmp_path / 'meanflow.npz', ref_mu=mu, ref_sigma=sigma)
  assert ReferenceStats.load(tmp_path / 'meanflow.npz').sigma.shape == (2048, 2048)

  np.savez(tmp_path / 'nokeys.npz', a=mu)
  np.savez(tmp_path / 'shape.npz', mu=mu[:64], sigma=sigma[:64, :64])
  (tmp_path / 'text.npz').write_text('not an archive')
  for name, message in (('missing.npz', 'does not exist'), ('nokeys.npz', 'no FID statistics'),
                        ('shape.npz', r'mu has shape \(64,\), expected \[2048\]'),
                        ('text.npz', 'is not a .npz')):
    with pytest.raises(ReferenceError, match=message):
      ReferenceStats.load(tmp_path / name)


def test_frechet_to_features_low_rank_path():
  from disa_jax.eval.frechet import frechet_distance_to_features

  rng = np.random.default_rng(7)
  s2, m2 = _spd(rng, 48), rng.standard_normal(48)
  for n in (12, 48, 90):                      # N < D and N = D: exact N x N form; N > D: sqrtm
    f = rng.standard_normal((n, 48))
    want = frechet_distance(*feature_stats(f), m2, s2)
    assert frechet_distance_to_features(f, m2, s2) == pytest.approx(want, rel=1e-7)
  # FD(x, x) = 0 analytically. Numerically, the centred 6 x 6 product has a zero eigenvalue
  # that comes out as +-eps * lambda_max^2; its square root contributes up to
  # sqrt(eps) * lambda_max <= sqrt(eps) * tr(sigma) (observed: -8e-6 with tr ~ 2e3 on one
  # machine, ~0 on another). A wrong formula gives an FD of order tr(sigma) itself.
  few = rng.standard_normal((6, 2048))
  mu_f, sigma_f = feature_stats(few)
  bound = 4 * np.sqrt(np.finfo(np.float64).eps) * np.trace(sigma_f)
  assert abs(frechet_distance_to_features(few, mu_f, sigma_f)) < bound
  assert bound < 1e-6 * np.trace(sigma_f)


def test_inception_quality_against_its_own_reference(random_inception, tmp_path):
  """Images scored against statistics and a reference batch made of themselves: FID and sFID
  vanish, every sample lies on the reference manifold and vice versa."""
  from disa_jax.eval.inception import InceptionExtractor, load_inception
  from disa_jax.eval.metrics import InceptionQuality

  images = np.random.default_rng(8).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  f = InceptionExtractor(load_inception(random_inception[2]), batch_size=2)(images)
  mu, sigma = feature_stats(f['pool'])
  mu_s, sigma_s = feature_stats(f['spatial'])
  np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=images)
  q = InceptionQuality(random_inception[2], tmp_path / 'ref.npz', batch_size=2,
                       ref_features_cache=str(tmp_path / 'ref_pool.npz'))
  assert (q.name, q.primary, q.higher_is_better) == ('inception', 'fid', False)
  res = q.evaluate(images, np.zeros(6, np.int32))
  assert abs(res['fid']) < 1e-6 * np.trace(sigma) and abs(res['sfid']) < 1e-6 * np.trace(sigma_s)
  assert res['precision'] == 1.0 and res['recall'] == 1.0 and res['num_images'] == 6
  assert 'inception_score' not in res                       # needs >= 10 images (splits)
  np.testing.assert_allclose(np.load(tmp_path / 'ref_pool.npz')['pool'], f['pool'], rtol=1e-6)
  shifted = q.evaluate(255 - images, np.zeros(6, np.int32))
  assert shifted['fid'] > 1e-3
  only_mu = tmp_path / 'mar.npz'
  np.savez(only_mu, mu=mu, sigma=sigma)                      # MAR's adm_in256_stats format
  res2 = InceptionQuality(random_inception[2], only_mu, batch_size=2).evaluate(
    images, np.zeros(6, np.int32))
  assert set(res2) == {'fid', 'num_images'}
