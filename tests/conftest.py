"""Test session setup: 8 fake CPU devices and a shared persistent compilation cache.

Both must be configured before JAX initialises a backend, i.e. here at import time.
"""

import os
import sys
from pathlib import Path

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE = os.environ.get('DISA_TEST_XLA_CACHE',
                       str(Path.home() / '.cache' / 'disa_jax' / 'xla-tests'))
jax.config.update('jax_compilation_cache_dir', CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

DATA = Path(__file__).parent / 'data'
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope='session')
def data_dir():
  return DATA


@pytest.fixture(scope='session')
def tiny_config():
  from disa_jax.config import TINY_MODEL
  from disa_jax.systems.mar.model import MARConfig

  return MARConfig.from_dict(TINY_MODEL)


@pytest.fixture(scope='session')
def random_inception(tmp_path_factory):
  """(PyTorch reference, its .pth file, converted directory) of a random-weight FID Inception
  (shared by the Inception, metric and disa-eval tests; built once per session)."""
  torch = pytest.importorskip('torch')
  from disa_jax.convert.inception import convert
  from reference.inception import TorchInceptionV3, randomize_

  tmp = tmp_path_factory.mktemp('inception')
  model = randomize_(TorchInceptionV3(), seed=1)
  torch.save(model.state_dict(), tmp / 'pt_inception.pth')
  return model, tmp / 'pt_inception.pth', convert(tmp / 'pt_inception.pth', tmp / 'converted')
