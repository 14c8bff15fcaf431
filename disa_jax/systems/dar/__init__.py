"""D-AR (Gao & Shou 2025, showlab/D-AR): a Llama-style GPT over the 256 ids of a sequential
diffusion tokenizer, whose 8-step pixel flow decoder reads one 32-id group per step.

Public API:
  TokenizerConfig, Tokenizer, TokenizerRunner (encode / conditions / decode / stream), flow_grid
  GPTConfig, GPT, GPT_VARIANTS, Sampler (generate), SamplingOptions, Generation, cfg_schedule,
  layout_prefix, DecodeStream, to_uint8
  SpeculativeSampler (generate with a draft GPT; distribution-preserving)
  convert_tokenizer, convert_gpt, save_tokenizer, save_gpt, load_tokenizer, load_gpt
"""

from disa_jax.systems.dar.convert import (
  DarConversionError,
  convert_gpt,
  convert_tokenizer,
  load_gpt,
  load_tokenizer,
  save_gpt,
  save_tokenizer,
)
from disa_jax.systems.dar.gpt import GPT, GPT_VARIANTS, GPTConfig
from disa_jax.systems.dar.sampling import (
  DecodeStream,
  Generation,
  Sampler,
  SamplingOptions,
  TokenizerRunner,
  cfg_schedule,
  layout_prefix,
  to_uint8,
)
from disa_jax.systems.dar.speculative import SpeculativeSampler
from disa_jax.systems.dar.system import SYSTEM
from disa_jax.systems.dar.tokenizer import Tokenizer, TokenizerConfig, flow_grid

__all__ = [
  'SYSTEM', 'DarConversionError', 'DecodeStream', 'GPT', 'GPTConfig', 'GPT_VARIANTS', 'Generation',
  'Sampler', 'SamplingOptions', 'SpeculativeSampler', 'Tokenizer', 'TokenizerConfig', 'TokenizerRunner',
  'cfg_schedule', 'convert_gpt', 'convert_tokenizer', 'flow_grid', 'layout_prefix', 'load_gpt',
  'load_tokenizer', 'save_gpt', 'save_tokenizer', 'to_uint8',
]
