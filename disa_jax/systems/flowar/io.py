"""FlowAR model directories (kind 'flowar'): `systems/common/model_dir.py` over
`disa_jax.checkpoint`; model_config.json holds `FlowARConfig.to_dict()`.
"""

from __future__ import annotations

from disa_jax.systems.common.model_dir import load_system_model, save_system_model
from disa_jax.systems.flowar.config import FlowARConfig
from disa_jax.systems.flowar.model import FlowAR

KIND = 'flowar'


def save_flowar(directory, model: FlowAR, *, meta: dict | None = None, overwrite: bool = False):
  """Writes `model` as a model directory; returns its path."""
  return save_system_model(directory, model, kind=KIND, meta=meta, overwrite=overwrite)


def load_flowar(directory) -> FlowAR:
  """The FlowAR model of a model directory (`disa-convert flowar` / `save_flowar`)."""
  return load_system_model(directory, kind=KIND, label='FlowAR', config_cls=FlowARConfig,
                           model_cls=FlowAR)
