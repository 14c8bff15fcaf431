"""FlowAR model directories: save / load with `disa_jax.checkpoint` (kind 'flowar').

Layout as every disa_jax model directory: meta.json (kind 'flowar'), model_config.json
(`FlowARConfig.to_dict()`), params/ (orbax). Written atomically.
"""

from __future__ import annotations

from flax import nnx

from disa_jax.checkpoint import CheckpointError, read_meta, restore_params, save_model
from disa_jax.systems.flowar.config import FlowARConfig
from disa_jax.systems.flowar.model import FlowAR

KIND = 'flowar'


def save_flowar(directory, model: FlowAR, *, meta: dict | None = None, overwrite: bool = False):
  """Writes `model` as a model directory; returns its path."""
  return save_model(directory, model, kind=KIND, model_config=model.cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def load_flowar(directory) -> FlowAR:
  """The FlowAR model of a model directory (`disa-convert flowar` / `save_flowar`)."""
  meta, config = read_meta(directory)
  if meta.get('kind') != KIND:
    raise CheckpointError(f'{directory} holds a {meta.get("kind")!r} model, not a FlowAR model; '
                          'convert FlowAR weights with `disa-convert flowar`')
  cfg = FlowARConfig.from_dict(config)
  abstract = nnx.eval_shape(lambda: FlowAR(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = restore_params(directory, state)
  return nnx.merge(graphdef, state)
