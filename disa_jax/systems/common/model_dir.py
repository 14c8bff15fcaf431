"""A system's model directory: save / load with `disa_jax.checkpoint` under the system's kind.

Layout as every disa_jax model directory: meta.json (`kind`), model_config.json
(`config.to_dict()`), params/ (orbax), written atomically. Loading checks the kind, rebuilds the
config with `config_cls.from_dict`, builds the model abstractly (`nnx.eval_shape`) and restores
the parameters into it. FlowAR (`systems/flowar/io.py`) and xAR (`systems/xar/io.py`) use it.
"""

from __future__ import annotations

from flax import nnx

from disa_jax.checkpoint import CheckpointError, read_meta, restore_params, save_model


def save_system_model(directory, model, *, kind: str, meta: dict | None = None,
                      overwrite: bool = False):
  """Writes `model` (with a `.cfg.to_dict()`) as a model directory of `kind`; returns its path."""
  return save_model(directory, model, kind=kind, model_config=model.cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def load_system_model(directory, *, kind: str, label: str, config_cls, model_cls):
  """The `model_cls` model stored in `directory`; a one-line CheckpointError for another kind."""
  meta, config = read_meta(directory)
  if meta.get('kind') != kind:
    raise CheckpointError(f'{directory} holds a {meta.get("kind")!r} model, not a {label} model; '
                          f'convert {label} weights with `disa-convert {kind}`')
  cfg = config_cls.from_dict(config)
  abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = restore_params(directory, state)
  return nnx.merge(graphdef, state)
