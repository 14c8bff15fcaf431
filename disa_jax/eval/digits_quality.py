"""Sample quality of digits models without external weights.

A small MLP classifier (256 -> 128 -> 64 -> 10, ReLU) trained on the embedded dataset's
training split (`disa_jax.data.digits`) is shipped as `disa_jax/assets/digits_classifier.npz`
(plain arrays, loaded with allow_pickle=False; `train_classifier` reproduces it). For
generated images uint8 [N, 16, 16, 3] and their requested classes it gives
  accuracy   fraction classified as the requested class (higher is better)
  fd         Frechet distance between the classifier's 64-d penultimate features of the
             held-out real images and of the generated ones (lower is better; an "FID" in
             this classifier's feature space)
  confidence mean softmax probability of the requested class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from disa_jax.eval.frechet import feature_stats, frechet_distance

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / 'assets' / 'digits_classifier.npz'
LAYERS = (128, 64)


def _prepare(images, size: int = 16, name: str = 'digits') -> np.ndarray:
  """uint8 [N, size, size, 3|1] (or [N, size, size]) -> float32 [N, size^2] in [-1, 1]."""
  x = np.asarray(images)
  if x.ndim == 4:
    x = x.astype(np.float32).mean(axis=-1)
  if x.ndim != 3 or x.shape[1:] != (size, size):
    raise ValueError(f'{name} quality needs images [N, {size}, {size}, 3] uint8, got {x.shape}')
  return (x.astype(np.float32) / 255.0 * 2.0 - 1.0).reshape(len(x), -1)


def train_classifier(out: str | Path = DEFAULT_WEIGHTS, seed: int = 0, *, dataset=None,
                     layers=LAYERS, size: int = 16) -> dict:
  """Trains the classifier on `dataset`'s training split (scikit-learn MLP; default the
  digits) and writes the npz."""
  from sklearn.neural_network import MLPClassifier

  if dataset is None:
    from disa_jax.data import digits as dataset

  x, y = dataset.load_split_uint8('train')
  clf = MLPClassifier(hidden_layer_sizes=layers, alpha=1e-3, max_iter=400, random_state=seed)
  clf.fit(_prepare(x, size), y)
  weights = {}
  for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_, strict=True)):
    weights[f'w{i}'] = w.astype(np.float32)
    weights[f'b{i}'] = b.astype(np.float32)
  np.savez(out, **weights)
  return weights


class DigitsClassifier:
  """ReLU MLP from the npz; features = the last hidden layer."""

  def __init__(self, path: str | Path = DEFAULT_WEIGHTS, size: int = 16, name: str = 'digits'):
    self.size, self.name = size, name
    with np.load(path, allow_pickle=False) as f:
      n = len([k for k in f.files if k.startswith('w')])
      self.layers = [(f[f'w{i}'], f[f'b{i}']) for i in range(n)]

  def features_and_logits(self, images):
    h = _prepare(images, self.size, self.name)
    for w, b in self.layers[:-1]:
      h = np.maximum(h @ w + b, 0.0)
    w, b = self.layers[-1]
    return h, h @ w + b


class DigitsQuality:
  """`QualityMetric` for the bundled digits model (see `disa_jax.eval.quality`)."""

  name = 'digits'
  primary = 'fd'
  higher_is_better = False

  size = 16
  default_weights = DEFAULT_WEIGHTS

  def __init__(self, weights: str | Path | None = None):
    self.classifier = DigitsClassifier(weights or self.default_weights, self.size, self.name)
    real, _ = self._dataset().load_split_uint8('heldout')
    feats, _ = self.classifier.features_and_logits(real)
    self.real_mu, self.real_sigma = feature_stats(feats)

  @staticmethod
  def _dataset():
    from disa_jax.data import digits

    return digits

  def evaluate(self, images, labels) -> dict[str, float]:
    labels = np.asarray(labels)
    if len(labels) != len(images):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    feats, logits = self.classifier.features_and_logits(images)
    pred = logits.argmax(axis=1)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mu, sigma = feature_stats(feats)
    return {
      'accuracy': float((pred == labels).mean()),
      'fd': frechet_distance(self.real_mu, self.real_sigma, mu, sigma),
      'confidence': float(p[np.arange(len(labels)), labels].mean()),
      'num_images': int(len(labels)),
    }
