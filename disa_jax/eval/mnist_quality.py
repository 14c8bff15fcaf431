"""Sample quality of the bundled MNIST model without external weights.

A small MLP classifier (1024 -> 256 -> 128 -> 10, ReLU) trained on the training split of
`disa_jax.data.mnist` is shipped as `disa_jax/assets/mnist_classifier.npz` (plain arrays,
loaded with allow_pickle=False; `train_classifier()` reproduces it). For generated images
uint8 [N, 32, 32, 3] and their requested classes it gives
  accuracy   fraction classified as the requested class (higher is better)
  fd         Frechet distance between the classifier's 128-d penultimate features of the
             500 held-out real digits and of the generated ones (lower is better; an "FID"
             in this classifier's feature space)
  confidence mean softmax probability of the requested class.
The code path is the digits metric's (`disa_jax.eval.digits_quality`) at 32x32.
"""

from __future__ import annotations

from pathlib import Path

from disa_jax.eval import digits_quality

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / 'assets' / 'mnist_classifier.npz'
LAYERS = (256, 128)
SIZE = 32


def train_classifier(out: str | Path = DEFAULT_WEIGHTS, seed: int = 0) -> dict:
  """Trains the classifier on the MNIST training split and writes the npz."""
  from disa_jax.data import mnist

  return digits_quality.train_classifier(out, seed, dataset=mnist, layers=LAYERS, size=SIZE)


class MnistQuality(digits_quality.DigitsQuality):
  """`QualityMetric` for the bundled MNIST model (see `disa_jax.eval.quality`)."""

  name = 'mnist'
  size = SIZE
  default_weights = DEFAULT_WEIGHTS

  @staticmethod
  def _dataset():
    from disa_jax.data import mnist

    return mnist
