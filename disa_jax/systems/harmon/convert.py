"""Harmon weights -> a disa_jax model directory (strict; safe loading only).

  from disa_jax.systems.harmon.convert import convert
  convert('harmon_1.5b.pth', 'ckpt/harmon_1_5b')              # flat bf16 state dict (wusize/harmon)
  convert('model.safetensors', 'ckpt/harmon_0_5b')             # HF-format wusize/Harmon-0_5B

Key groups (shared/spec/harmon.md §4): `llm.*` (Qwen2ForCausalLM), `mar.*` (the MAR ImageNet key
set, head under `mar.diffloss.net.*`), `proj_in.{0,2}.*`, `proj_out.{0,2}.*`, optional `vae.*`.
Rules: the module tree mirrors the official names, so every key maps by the MAR converter's
mechanical rules (`disa_jax.convert.mapping`: Linear weight -> kernel = weight^T, norm weight
-> scale, embedding weight -> embedding). `llm.lm_head.weight` is the tied embedding: accepted
only if equal in shape (and ignored); `vae.*` (the KL-16 VAE, frozen and loaded separately in
disa_jax) is reported and ignored. The variant (0.5B / 1.5B) is read off the shapes. Every other
missing, unexpected or mis-shaped key is an error listing them; nothing is written then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.checkpoint import CheckpointError, save_model
from disa_jax.convert import source
from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict
from disa_jax.convert.torch_io import load_state_dict
from disa_jax.layers.qwen2 import Qwen2Config, Qwen2Model
from disa_jax.systems.harmon.config import VARIANTS, HarmonConfig
from disa_jax.systems.mar.convert import infer_config as infer_mar_config

IGNORED_PREFIXES = ('vae.',)
TIED_KEY = 'llm.lm_head.weight'
EMBED_KEY = 'llm.model.embed_tokens.weight'
# Query heads of the official Qwen2.5 trunks by hidden size (not visible in the weights).
HEADS_BY_HIDDEN = {896: 14, 1536: 12}
GROUPS = ('llm.', 'mar.', 'proj_in.', 'proj_out.')


def split_groups(shapes: Mapping[str, tuple]) -> tuple[dict, list[str], list[str]]:
  """(kept shapes, ignored keys, unknown-prefix keys). Ignored: vae.* and the tied LM head."""
  kept, ignored, unknown = {}, [], []
  for k, v in shapes.items():
    if k.startswith(IGNORED_PREFIXES) or k == TIED_KEY:
      ignored.append(k)
    elif k.startswith(GROUPS):
      kept[k] = tuple(v)
    else:
      unknown.append(k)
  return kept, ignored, unknown


def _need(shapes, key):
  if key not in shapes:
    raise ConversionError(f'checkpoint does not match a Harmon model: key {key} is missing')
  return shapes[key]


def infer_config(shapes: Mapping[str, tuple], *, variant: str | None = None,
                 num_heads: int | None = None, mar_num_heads: int | None = None
                 ) -> tuple[HarmonConfig, str]:
  """(HarmonConfig, variant name) from the torch shapes of a Harmon state dict.

  Attention head counts are not visible in the weights: they come from the official widths
  (LLM 896 -> 14, 1536 -> 12; MAR 768 -> 12, 1280 -> 16) or `num_heads` / `mar_num_heads`.
  """
  kept, _, unknown = split_groups(shapes)
  if unknown:
    raise ConversionError(
      f'checkpoint does not match a Harmon model: {len(unknown)} keys outside llm./mar./'
      f'proj_in./proj_out./vae. (first: {", ".join(sorted(unknown)[:5])})')
  vocab, hidden = _need(kept, EMBED_KEY)
  if TIED_KEY in shapes and tuple(shapes[TIED_KEY]) != (vocab, hidden):
    raise ConversionError(f'{TIED_KEY} has shape {tuple(shapes[TIED_KEY])}, but the tied '
                          f'embedding is {(vocab, hidden)}')
  rx = re.compile(r'llm\.model\.layers\.(\d+)\.')
  layers = {int(m.group(1)) for k in kept if (m := rx.match(k))}
  heads = num_heads or HEADS_BY_HIDDEN.get(hidden)
  if heads is None:
    raise ConversionError(f'cannot infer the attention heads of a {hidden}-wide Qwen2 '
                          f'(official widths 896, 1536); pass num_heads')
  q_rows = _need(kept, 'llm.model.layers.0.self_attn.q_proj.weight')[0]
  hd = q_rows // heads
  kv_rows = _need(kept, 'llm.model.layers.0.self_attn.k_proj.weight')[0]
  if q_rows % heads or kv_rows % hd:
    raise ConversionError(f'q_proj rows {q_rows} / k_proj rows {kv_rows} do not fit {heads} '
                          'heads')
  llm = Qwen2Config(vocab_size=vocab, hidden_size=hidden,
                    intermediate_size=_need(kept, 'llm.model.layers.0.mlp.gate_proj.weight')[0],
                    num_hidden_layers=max(layers) + 1 if layers else 0, num_attention_heads=heads,
                    num_key_value_heads=kv_rows // hd,
                    head_dim=0 if hd * heads == hidden else hd)
  mar_shapes = {k[len('mar.'):]: v for k, v in kept.items() if k.startswith('mar.')}
  mar, mar_name = infer_mar_config(mar_shapes, num_heads=mar_num_heads)
  cfg = HarmonConfig(llm=llm, mar=mar)
  name = next((n for n, v in VARIANTS.items() if v == cfg), 'harmon_custom')
  if variant is not None:
    if variant not in VARIANTS:
      raise CheckpointError(f'unknown variant {variant!r}; choose {", ".join(VARIANTS)}')
    if name != variant:
      raise ConversionError(f'checkpoint is not {variant} (LLM width {hidden}, {len(layers)} '
                            f'layers; MAR {mar_name}); omit the variant to infer it')
  return cfg, name


def check(shapes: Mapping[str, tuple], *, variant: str | None = None,
          **heads) -> tuple[HarmonConfig, str]:
  """Shape-only dry run of `convert` (strict key / shape validation, nothing allocated)."""
  from disa_jax.systems.harmon.model import Harmon

  cfg, name = infer_config(shapes, variant=variant, **heads)
  kept, _, _ = split_groups(shapes)
  abstract = nnx.state(nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0))))
  check_state_dict(kept, abstract, what=f'{name} model')
  return cfg, name


def harmon_from_state_dict(state_dict: Mapping[str, np.ndarray], *, variant: str | None = None,
                           dtype: str = 'float32', **heads):
  """(Harmon module with checkpoint shapes, variant name, ignored keys) from a flat state dict."""
  from disa_jax.systems.harmon.model import Harmon

  shapes = source.shapes_of(state_dict)
  cfg, name = infer_config(shapes, variant=variant, **heads)
  kept, ignored, _ = split_groups(shapes)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0))))
  state = convert_state_dict({k: state_dict[k] for k in kept}, abstract, what=f'{name} model')
  model = nnx.merge(graphdef, state)
  if dtype != 'float32':
    cfg = cfg.with_dtype(dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, nnx.state(_cast(model, dtype)))
  return model, name, ignored


def convert(checkpoint, out, *, variant: str | None = None, dtype: str = 'float32',
            overwrite: bool = False, weights: str = 'ema', **heads) -> Path:
  """Converts `harmon_{0.5b,1.5b}.pth` (flat state dict, loaded with weights_only=True) or an
  HF-format `model.safetensors` into the model directory `out` (written atomically).

  dtype: 'float32' (the released bf16 values are exact in fp32) or 'bfloat16'.
  weights: `disa-convert`'s --weights; Harmon releases one set of weights, so only the default
  'ema' (= the released weights) is accepted.
  """
  if weights != 'ema':
    raise CheckpointError(f'--weights={weights} does not apply to Harmon (one released set of '
                          'weights); drop it')
  if dtype not in ('float32', 'bfloat16'):
    raise CheckpointError(f'dtype must be float32 or bfloat16, got {dtype!r}')
  out = source.check_output(out, overwrite)
  sd, _ = load_state_dict(checkpoint)
  model, name, ignored = harmon_from_state_dict(sd, variant=variant, dtype=dtype, **heads)
  del sd
  meta = {'variant': name, 'source': str(Path(checkpoint).expanduser().absolute()),
          'ignored_keys': len(ignored), 'converted_by': 'disa_jax.systems.harmon.convert'}
  return save_model(out, model, kind='harmon', model_config=model.config.to_dict(), meta=meta,
                    overwrite=overwrite)


def load_harmon(directory, *, dtype: str | None = None):
  """Loads a Harmon model directory written by `convert` -> `Harmon` (checkpoint shapes)."""
  from disa_jax.checkpoint import read_meta, restore_params
  from disa_jax.systems.harmon.model import Harmon

  meta, stored = read_meta(directory)
  if meta.get('kind') != 'harmon':
    raise CheckpointError(f'{directory} holds a {meta.get("kind")!r} model, not Harmon; '
                          'convert harmon_*.pth with disa_jax.systems.harmon.convert first')
  cfg = HarmonConfig.from_dict(stored)
  if dtype:
    cfg = cfg.with_dtype(dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Harmon(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, restore_params(directory, state))


def load_qwen2_state_dict(config: Qwen2Config, state_dict: Mapping[str, np.ndarray]) -> Qwen2Model:
  """A `Qwen2Model` from an HF `Qwen2Model` state dict (keys `embed_tokens.weight`, `layers.*`,
  `norm.weight`; a `model.` prefix and a tied `lm_head.weight` are accepted). Strict."""
  sd = {k[len('model.'):] if k.startswith('model.') else k: v for k, v in state_dict.items()
        if k != 'lm_head.weight'}
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2Model(config, rngs=nnx.Rngs(0))))
  state = convert_state_dict(sd, abstract, what='Qwen2 model')
  return _cast(nnx.merge(graphdef, state), config.dtype)


def _cast(model, dtype: str):
  if dtype == 'float32':
    return model
  import jax
  import jax.numpy as jnp

  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
  return nnx.merge(graphdef, state)
