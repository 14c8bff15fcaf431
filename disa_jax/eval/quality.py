"""Quality metrics behind one interface, so speed-quality curves and benchmarks can use
Inception FID/IS on ImageNet models or the embedded classifier score on the bundled model.

A metric is an object with
  name: str
  primary: str                         # key of the headline number, e.g. 'fid'
  higher_is_better: bool               # for `primary`
  evaluate(images, labels) -> dict     # images uint8 [N, H, W, 3], labels int [N]
and is created by `get_quality_metric(name, **kwargs)`:
  'digits'     -> disa_jax.eval.digits_quality.DigitsQuality   (sklearn digits; no weights)
  'mnist'      -> disa_jax.eval.mnist_quality.MnistQuality     (bundled model; no weights)
  'inception'  -> disa_jax.eval.metrics.InceptionQuality       (needs converted Inception
                  weights and reference statistics)
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

REGISTRY = {
  'digits': 'disa_jax.eval.digits_quality:DigitsQuality',
  'mnist': 'disa_jax.eval.mnist_quality:MnistQuality',
  'inception': 'disa_jax.eval.metrics:InceptionQuality',
}


class QualityMetric(Protocol):
  name: str
  primary: str
  higher_is_better: bool

  def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]: ...


def get_quality_metric(name: str, **kwargs) -> QualityMetric:
  if name not in REGISTRY:
    raise ValueError(f'unknown quality metric {name!r}; choose one of {sorted(REGISTRY)}')
  module, _, cls = REGISTRY[name].partition(':')
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ValueError(f'quality metric {name!r} is not available in this version ({e})') from None
  return getattr(mod, cls)(**kwargs)
