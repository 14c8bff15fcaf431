"""xAR model directories: save / load with `disa_jax.checkpoint` (kind 'xar').

Layout as every disa_jax model directory: meta.json (kind 'xar'), model_config.json
(`XARConfig.to_dict()`), params/ (orbax). Written atomically.
"""

from __future__ import annotations

from flax import nnx

from disa_jax.checkpoint import CheckpointError, read_meta, restore_params, save_model
from disa_jax.systems.xar.config import XARConfig
from disa_jax.systems.xar.model import XAR

KIND = 'xar'


def save_xar(directory, model: XAR, *, meta: dict | None = None, overwrite: bool = False):
  """Writes `model` as a model directory; returns its path."""
  return save_model(directory, model, kind=KIND, model_config=model.cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def load_xar(directory) -> XAR:
  """The xAR model of a model directory (`disa-convert xar` / `save_xar`)."""
  meta, config = read_meta(directory)
  if meta.get('kind') != KIND:
    raise CheckpointError(f'{directory} holds a {meta.get("kind")!r} model, not a xAR model; '
                          'convert XAR weights with `disa-convert xar`')
  cfg = XARConfig.from_dict(config)
  abstract = nnx.eval_shape(lambda: XAR(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = restore_params(directory, state)
  return nnx.merge(graphdef, state)
