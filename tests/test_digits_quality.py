"""DigitsQuality: the embedded classifier score used by the demo and speed-quality curves."""

import numpy as np
import pytest

from disa_jax.data.digits import load_split_uint8
from disa_jax.eval.quality import get_quality_metric


@pytest.fixture(scope='module')
def metric():
  return get_quality_metric('digits')


def test_real_heldout_digits_score_high(metric):
  assert metric.name == 'digits' and metric.primary == 'fd' and not metric.higher_is_better
  x, y = load_split_uint8('heldout')
  full = metric.evaluate(x, y)
  assert full['accuracy'] >= 0.95 and full['confidence'] > 0.9
  assert abs(full['fd']) < 1e-6            # the reference statistics are these images
  half = metric.evaluate(x[::2], y[::2])   # a subset: only sampling noise
  assert half['accuracy'] >= 0.95 and half['fd'] < 10


def test_noise_and_wrong_labels_score_low(metric):
  x, y = load_split_uint8('heldout')
  noise = np.random.default_rng(0).integers(0, 256, x.shape).astype(np.uint8)
  bad = metric.evaluate(noise, y)
  good = metric.evaluate(x[::2], y[::2])
  assert bad['accuracy'] < 0.3 and bad['fd'] > 20 * good['fd']
  shifted = metric.evaluate(x, (y + 1) % 10)    # right images, wrong requested classes
  assert shifted['accuracy'] < 0.1


def test_bad_input_is_rejected(metric):
  with pytest.raises(ValueError, match=r'needs images \[N, 16, 16, 3\] uint8'):
    metric.evaluate(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, int))
