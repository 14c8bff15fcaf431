"""Model directories: orbax-saved parameters plus the architecture, written atomically.

Layout of a model directory (written by `disa-convert`, `disa-train --export` or
`save_model`):
  meta.json           {"format": "disa_jax.model", "kind": "mar" | "vae", "version": 1, ...}
  model_config.json   the architecture (MARConfig fields / VAE config)
  params/             orbax StandardCheckpointer tree of the nnx.Param state

Everything is written into a temporary sibling directory and renamed at the end, so a
failed or interrupted write never leaves a half-written model directory behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from disa_jax import integrity
from disa_jax.errors import UserError

FORMAT = 'disa_jax.model'
VERSION = 1


class CheckpointError(UserError):
  """A model directory that cannot be used; the message says why and what to do."""


def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False):
  """Yields a temporary directory that becomes `final` only if the block succeeds
  (`disa_jax.io.output.atomic_directory`, with CheckpointError for an existing `final`)."""
  from disa_jax.io.output import atomic_directory as atomic

  return atomic(final, overwrite=overwrite, error=CheckpointError)


def _pure(state):
  return jax.tree.map(lambda x: np.asarray(x), nnx.to_pure_dict(state))


def _stringify_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _stringify_keys(v) for k, v in tree.items()}
  return tree


def save_params(directory: Path, state) -> None:
  """Saves an nnx State (or nested dict of arrays) with orbax into `directory/params`."""
  tree = _stringify_keys(_pure(state) if isinstance(state, nnx.State) else state)
  # Synchronous on purpose: an async save that fails (e.g. a full disk) can leave background
  # threads still creating files while the caller removes the temporary directory.
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    ckptr.save(Path(directory).absolute() / 'params', args=ocp.args.StandardSave(tree))
  finally:
    ckptr.close()


def save_model(directory, module, *, kind: str, model_config: dict, meta: dict | None = None,
               overwrite: bool = False) -> Path:
  """Writes `module`'s parameters and its config as a model directory (atomically)."""
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    save_params(tmp, nnx.state(module, nnx.Param))
    (tmp / 'model_config.json').write_text(json.dumps(model_config, indent=2, sort_keys=True))
    info = {'format': FORMAT, 'kind': kind, 'version': VERSION, **(meta or {})}
    (tmp / 'meta.json').write_text(json.dumps(info, indent=2, sort_keys=True))
    integrity.write_checksums(tmp)
  return Path(directory)


def read_meta(directory) -> tuple[dict, dict]:
  """(meta, model_config) of a model directory, with clear errors for wrong paths."""
  d = Path(directory).expanduser()
  if not d.exists():
    raise CheckpointError(f'checkpoint directory {d} does not exist')
  if not d.is_dir():
    raise CheckpointError(
      f'{d} is a file, not a disa_jax model directory; convert official weights first with '
      '`disa-convert mar|vae --torch-checkpoint FILE --out DIR`')
  meta_path = d / 'meta.json'
  if not meta_path.exists() or not (d / 'params').exists():
    raise CheckpointError(
      f'{d} is not a disa_jax model directory (no meta.json / params/); create one with '
      '`disa-convert` or `disa-train`')
  meta = integrity.read_json(meta_path, what='model metadata')
  if meta.get('format') != FORMAT:
    raise CheckpointError(f'{d}/meta.json has format {meta.get("format")!r}, expected {FORMAT}')
  return meta, integrity.read_json(d / 'model_config.json', what='model config')


def restore_params(directory, abstract_state):
  """Restores `directory/params` into the structure of `abstract_state` (an nnx State)."""
  target = _stringify_keys(jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_state)))
  integrity.verify_checksums(directory)
  ckptr = ocp.StandardCheckpointer()
  try:
    tree = ckptr.restore(Path(directory).absolute() / 'params', target)
  except (ValueError, KeyError) as e:
    if 'shape' not in str(e).lower() and 'not found' not in str(e).lower():
      raise integrity.CorruptModelError(
        f'cannot read the parameters of model directory {directory} ({_first_line(e)}); it is '
        'corrupt: re-create it (disa-convert / disa-train --export)') from None
    raise CheckpointError(f'parameters in {directory} do not match the model: {e}') from None
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on bad files
    raise integrity.CorruptModelError(
      f'cannot read the parameters of model directory {directory} ({_first_line(e)}); it is '
      'corrupt: re-create it (disa-convert / disa-train --export)') from None
  integrity.check_finite_arrays(tree, str(directory))
  pure = nnx.to_pure_dict(abstract_state)
  _fill(pure, tree)
  nnx.replace_by_pure_dict(abstract_state, pure)
  return abstract_state


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0][:200] if text else e.__class__.__name__)


def _fill(pure, tree):
  for k in list(pure):
    v = tree[str(k)]
    if isinstance(pure[k], dict):
      _fill(pure[k], v)
    else:
      if tuple(v.shape) != tuple(pure[k].shape):
        raise CheckpointError(f'parameter {k}: stored shape {v.shape}, model {pure[k].shape}')
      pure[k] = jnp.asarray(v)


def load_vae(directory, *, overrides: dict | None = None):
  """Loads a VAE model directory (`disa-convert vae`) -> `disa_jax.models.vae.AutoencoderKL`.

  `overrides` changes runtime-only fields (e.g. {'dtype': 'bfloat16'}).
  """
  from disa_jax.tokenizers.kl16 import AutoencoderKL, VAEConfig

  meta, stored = read_meta(directory)
  if meta.get('kind') != 'vae':
    raise CheckpointError(
      f'{directory} holds a {meta.get("kind")!r} model, not a VAE; pass the directory written '
      'by `disa-convert vae` to --vae (a MAR model goes to --checkpoint)')
  cfg = VAEConfig.from_dict({**stored, **(overrides or {})})
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = restore_params(directory, state)
  return nnx.merge(graphdef, state)


def load_mar(directory, *, expect_config: dict | None = None, overrides: dict | None = None):
  """Loads a MAR model directory -> `disa_jax.models.MAR` with its parameters.

  `expect_config` (e.g. the CLI's `config.model`) is compared with the stored architecture;
  a difference in any architecture field raises a `CheckpointError` naming it. `overrides`
  changes compute fields (`systems.mar.model.COMPUTE_FIELDS`: dtype, attn_splits).
  """
  from disa_jax.systems.mar.model import MAR, MARConfig

  meta, stored = read_meta(directory)
  if meta.get('kind') != 'mar':
    raise CheckpointError(
      f'{directory} holds a {meta.get("kind")!r} model, not MAR; pass it to the right flag '
      '(a VAE goes to --vae)')
  stored = {**stored, **(overrides or {})}
  if expect_config is not None:
    diff = architecture_diff(expect_config, stored)
    if diff:
      raise CheckpointError(
        f'config and checkpoint disagree on the architecture ({"; ".join(diff)}); use the config '
        f'that matches the checkpoint (e.g. configs/{meta.get("variant", "mar_base")}.py)')
  cfg = MARConfig.from_dict(stored)
  abstract = nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = restore_params(directory, state)
  return nnx.merge(graphdef, state)


def architecture_diff(expected: dict, stored: dict, ignore=None) -> list[str]:
  """'field: config X vs checkpoint Y' for every architecture field that differs; `ignore`
  defaults to MAR's non-architecture fields (`systems.mar.model.NON_ARCHITECTURE_FIELDS`)."""
  if ignore is None:
    from disa_jax.systems.mar.model import NON_ARCHITECTURE_FIELDS as ignore
  out = []
  for k in sorted(set(expected) | set(stored)):
    if k in ignore:
      continue
    if expected.get(k) != stored.get(k):
      out.append(f'{k}: config {expected.get(k)!r} vs checkpoint {stored.get(k)!r}')
  return out
