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

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict
from disa_jax.layers.qwen2 import Qwen2Config, Qwen2Model

IGNORED_PREFIXES = ('vae.',)
TIED_KEY = 'llm.lm_head.weight'


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
