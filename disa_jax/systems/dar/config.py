"""D-AR configs (ml_collections): model / sampling / runtime sections, official settings.

`dar_config(variant, cpu=..., tiny=...)` backs `configs/dar/{l,xl}.py`:
  model.gpt        GPTConfig fields (GPT-L 24 x 1024 / GPT-XL 36 x 1280, vocab 16384, 256 ids)
  model.tokenizer  TokenizerConfig fields (tokenizer v1)
  sampling         official FID setting: cfg "1.2,8.0" (linear over positions), top-k 0,
                   top-p 1.0, temperature 1.0, 64 images per batch; the demo uses cfg "4.0"
  runtime          GPT dtype (official runs: bfloat16 weights), matmul precision
  `cpu`: full token layout (256x256 images, 256 ids in 8 groups) at toy widths, random weights;
  `tiny`: unit-test sizes (64x64 images, 16 ids in 4 groups).
`build_models(config)` returns (GPT, Tokenizer) from the converted directories named by
`config.checkpoint` / `config.tokenizer_checkpoint`, or random weights when those are empty.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.gpt import GPT, GPT_VARIANTS, GPTConfig, cast_params
from disa_jax.systems.dar.tokenizer import Tokenizer, TokenizerConfig

CPU_GPT = dict(dim=128, n_layer=2, n_head=2)
CPU_TOKENIZER = dict(width=64, encoder_layers=1, decoder_layers=1, flow_width=64, flow_depth=1)
TINY_GPT = dict(dim=128, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)
TINY_TOKENIZER = dict(image_size=64, width=64, encoder_layers=2, decoder_layers=2,
                      num_queries=16, num_groups=4, queries_per_group=4, num_steps=4,
                      table_size=32, codebook_size=64, flow_width=64, flow_depth=2)
# Widths of random-weight drafts (`sampling.draft = 'random:SIZE'`): LlamaGen's GPT-B shape,
# D-AR's two, and a toy one for the CPU / tiny configs.
DRAFT_SIZES = {'b': dict(dim=768, n_layer=12, n_head=12), **GPT_VARIANTS,
               'toy': dict(dim=64, n_layer=1, n_head=1)}
OFFICIAL_FILES = {'l': 'D-AR-L-360K.pt', 'xl': 'D-AR-XL-360K.pt',
                  'tokenizer': 'D-AR-tokenizer_v1.pt'}


def sampling_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.cfg = '1.2,8.0'          # "start,end": linear CFG over image-token positions; "4.0": constant
  c.temperature = 1.0
  c.top_k = 0                # 0 = off
  c.top_p = 1.0              # 1.0 = off
  c.num_images = 64
  c.batch_size = 64          # per batch (official FID: 64 per GPU)
  c.classes = ''             # comma-separated class ids cycled over the images ('' = random)
  c.seed = 0
  c.previews = False         # keep the streaming preview after every group
  c.prefix_groups = 0        # layout control: groups of ids taken from a reference
  c.layout_from = ''         # reference image for layout control ('' = none)
  c.prefix_from_sample = False
  c.num_tokens = 0           # knob: early stop after this many ids, image = last preview (0 = off)
  c.decoder_steps = 0        # knob: coarser decoder grid of S < groups steps (0 = official)
  c.num_groups = 8           # the tokenizer's groups (stages), set from model.tokenizer
  c.draft = ''               # speculative decoding (speculative.py): a converted D-AR GPT
                             # directory, or random:SIZE (SIZE in DRAFT_SIZES, benchmarks)
  c.draft_tokens = 4         # ids drafted per round
  c.speculate_from = 0       # first id generated speculatively (0 = the second half)
  c.update(overrides)
  return c


def runtime_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.gpt_dtype = 'bfloat16'   # official: the GPT module is cast to bf16; tokenizer stays fp32
  c.matmul_precision = ''    # '' backend default, or 'highest' (parity runs)
  c.compilation_cache = '~/.cache/disa_jax/xla'
  c.update(overrides)
  return c


def dar_config(variant: str, *, cpu: bool = False, tiny: bool = False
               ) -> ml_collections.ConfigDict:
  if variant not in GPT_VARIANTS:
    raise UserError(f'unknown D-AR variant {variant!r}; choose one of {sorted(GPT_VARIANTS)}')
  c = ml_collections.ConfigDict()
  c.system = 'dar'
  c.name = f'dar_{variant}' + ('-tiny' if tiny else '-cpu' if cpu else '')
  gpt = dict(GPT_VARIANTS[variant])
  tok = {}
  if tiny:
    gpt.update(TINY_GPT)
    tok.update(TINY_TOKENIZER)
  elif cpu:
    gpt.update(CPU_GPT)
    tok.update(CPU_TOKENIZER)
  c.model = ml_collections.ConfigDict()
  c.model.gpt = ml_collections.ConfigDict(GPTConfig(**gpt).to_dict())
  c.model.tokenizer = ml_collections.ConfigDict(TokenizerConfig(**tok).to_dict())
  c.checkpoint = ''            # GPT model directory (disa-convert dar)
  c.tokenizer_checkpoint = ''  # tokenizer model directory (disa-convert dar-tokenizer)
  c.sampling = sampling_config()
  c.runtime = runtime_config()
  c.sampling.num_groups = c.model.tokenizer.num_groups
  if cpu or tiny:
    c.sampling.update(num_images=4, batch_size=4)
    c.runtime.gpt_dtype = 'float32'
  return c


def random_draft_size(spec: str) -> str | None:
  """SIZE of a `random:SIZE` draft spec (UserError if unknown), None for a directory."""
  if not spec.startswith('random:'):
    return None
  size = spec.split(':', 1)[1]
  if size not in DRAFT_SIZES:
    raise UserError(f'--draft={spec}: unknown size; choose random:SIZE with SIZE one of '
                    f'{", ".join(sorted(DRAFT_SIZES))}')
  return size


def build_draft(config, *, seed: int = 0) -> GPT | None:
  """The draft GPT of `sampling.draft` (None when off): a converted directory, or random
  weights of a DRAFT_SIZES width with the target's vocabulary, length and classes."""
  from disa_jax.systems.dar.convert import load_gpt

  spec, dtype = str(config.sampling.get('draft', '') or ''), config.runtime.gpt_dtype
  if not spec:
    return None
  size = random_draft_size(spec)
  if size:
    gpt = GPT(GPTConfig.from_dict({**config.model.gpt.to_dict(), **DRAFT_SIZES[size],
                                   'ffn_hidden': 0, 'dtype': dtype}), rngs=nnx.Rngs(seed + 7))
    if dtype == 'bfloat16':
      cast_params(gpt, jnp.bfloat16)
    return gpt
  return load_gpt(spec, dtype=dtype, block_size=config.model.gpt.block_size)


def build_models(config, *, seed: int = 0) -> tuple[GPT, Tokenizer]:
  """(GPT, Tokenizer) from the config's model directories, or random weights if unset."""
  from disa_jax.systems.dar.convert import load_gpt, load_tokenizer

  dtype = config.runtime.gpt_dtype
  if config.checkpoint:
    gpt = load_gpt(config.checkpoint, dtype=dtype, block_size=config.model.gpt.block_size)
  else:
    gpt = GPT(GPTConfig.from_dict({**config.model.gpt.to_dict(), 'dtype': dtype}),
              rngs=nnx.Rngs(seed))
    if dtype == 'bfloat16':
      cast_params(gpt, jnp.bfloat16)
  if config.tokenizer_checkpoint:
    tok = load_tokenizer(config.tokenizer_checkpoint)
  else:
    tok = Tokenizer(TokenizerConfig.from_dict(config.model.tokenizer.to_dict()),
                    rngs=nnx.Rngs(seed + 1))
  if gpt.cfg.block_size != tok.cfg.num_queries or gpt.cfg.vocab_size != tok.cfg.codebook_size:
    raise UserError(f'GPT ({gpt.cfg.block_size} ids, vocab {gpt.cfg.vocab_size}) and tokenizer '
                    f'({tok.cfg.num_queries} ids, codebook {tok.cfg.codebook_size}) do not fit')
  return gpt, tok
