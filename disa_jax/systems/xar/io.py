"""xAR model directories (kind 'xar'): `systems/common/model_dir.py` over
`disa_jax.checkpoint`; model_config.json holds `XARConfig.to_dict()`.
"""

from __future__ import annotations

from disa_jax.systems.common.model_dir import load_system_model, save_system_model
from disa_jax.systems.xar.config import XARConfig
from disa_jax.systems.xar.model import XAR

KIND = 'xar'


def save_xar(directory, model: XAR, *, meta: dict | None = None, overwrite: bool = False):
  """Writes `model` as a model directory; returns its path."""
  return save_system_model(directory, model, kind=KIND, meta=meta, overwrite=overwrite)


def load_xar(directory) -> XAR:
  """The xAR model of a model directory (`disa-convert xar` / `save_xar`)."""
  return load_system_model(directory, kind=KIND, label='xAR', config_cls=XARConfig,
                           model_cls=XAR)
