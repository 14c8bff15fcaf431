"""Shared config pieces for `configs/*.py` (ml_collections, big_vision style).

A config file defines `get_config(arg)`; `arg` is the text after ':' in
`--config=configs/mar_base.py:cpu`, parsed by `parse_arg` into typed options. Every field can
be overridden on the command line: `--config.sampling.num_iter=256`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Official architectures (LTH14/mar; head depth/width per the released checkpoints).
MAR_VARIANTS = {
  'mar_base': dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                   decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                   diffloss_d=6, diffloss_w=1024),
  'mar_large': dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                    decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                    diffloss_d=8, diffloss_w=1280),
  'mar_huge': dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                   decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                   diffloss_d=12, diffloss_w=1536),
}
# Paper CFG scales (linear schedule) and per-device eval batch sizes.
PAPER_CFG = {'mar_base': 2.9, 'mar_large': 3.0, 'mar_huge': 3.2}
PAPER_DISA_CFG = {'mar_base': 2.9, 'mar_large': 3.0, 'mar_huge': 3.3}
PAPER_BATCH = {'mar_base': 256, 'mar_large': 256, 'mar_huge': 128}

# CPU-sized variants: same token layout as the official model (256 tokens, 64-slot buffer)
# for `cpu`, and a 16-token toy for `tiny` (unit tests).
CPU_MODEL = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                 diffloss_d=2, diffloss_w=128)
TINY_MODEL = dict(CPU_MODEL, img_size=64, buffer_size=8, class_num=10)


def model_config(**fields) -> ml_collections.ConfigDict:
  """Every `MARConfig` field (so each is overridable from the command line)."""
  from disa_jax.systems.mar.model import MARConfig

  return ml_collections.ConfigDict(MARConfig.from_dict(fields).to_dict())


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'cpu,variant=mar_large' -> ConfigDict(cpu=True, variant='mar_large'), typed by defaults."""
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    if not eq:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(defaults[key])(value)
  return out


def sampling_config(**overrides) -> ml_collections.ConfigDict:
  """Sampler options: AR schedule, CFG, DiSA preset and output size."""
  c = ml_collections.ConfigDict()
  c.preset = 'disa'          # 'disa' (upper->lower steps, clamp 950) or 'baseline' (= 'mar')
  c.strategy = 'linear'      # constant | linear | cosine | two-stage (DiSA preset)
  c.upper_steps = 50
  c.lower_steps = 5
  c.steps = ''               # explicit per-AR-step list "50,49,..." (overrides the strategy)
  c.max_timestep = config_dict.placeholder(int)  # None: preset default; -1: no clamp
  c.num_iter = 64
  c.cfg = 2.9
  c.cfg_schedule = 'linear'  # linear | constant
  c.temperature = 1.0
  c.num_images = 8
  c.batch_size = 8           # global batch (split over devices and hosts)
  c.classes = ''             # comma-separated class ids cycled over the images ('' = all)
  c.seed = 0
  c.update(overrides)
  return c


def runtime_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enc_bucket = 0               # encoder length bucket; 0 = auto (seq_len / 16)
  c.max_head_waste = 0.05        # padding budget per head bucket
  c.matmul_precision = ''        # '' backend default, or 'highest' (parity runs)
  c.compilation_cache = '~/.cache/disa_jax/xla'   # persistent XLA cache ('' disables)
  c.num_devices = 0              # 0 = all devices
  c.update(overrides)
  return c


def tokenizer_config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = 'kl16'                # kl16 (needs a converted VAE) | pixels (identity tokens)
  c.vae = ''                     # directory written by `disa-convert vae`
  c.scale = 0.2325               # tokens = latent * scale (MAR's KL-16 normalisation)
  c.dtype = 'float32'            # VAE compute dtype: float32 | bfloat16 (faster decode)
  c.update(overrides)
  return c


def mar_config(variant: str, *, cpu: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Full config of an official MAR variant (or its CPU-sized / tiny stand-in)."""
  if variant not in MAR_VARIANTS:
    raise ValueError(f'unknown MAR variant {variant!r}; choose one of {sorted(MAR_VARIANTS)}')
  c = ml_collections.ConfigDict()
  c.system = 'mar'
  c.name = variant + ('-tiny' if tiny else '-cpu' if cpu else '')
  model = dict(MAR_VARIANTS[variant])
  if tiny:
    model.update(TINY_MODEL)
  elif cpu:
    model.update(CPU_MODEL)
  c.model = model_config(**model)
  c.checkpoint = ''              # directory written by `disa-convert mar` or `disa-train`
  c.tokenizer = tokenizer_config(kind='none' if (cpu or tiny) else 'kl16')
  c.sampling = sampling_config(cfg=PAPER_DISA_CFG[variant])
  if cpu or tiny:
    c.sampling.update(num_images=4, batch_size=4)
  if tiny:
    c.sampling.update(num_iter=8, upper_steps=10, lower_steps=3, cfg=2.0)
  c.runtime = runtime_config()
  c.data = data_config()
  c.train = train_config()
  if cpu or tiny:
    c.train.update(batch_size=8, num_steps=100, warmup_steps=10, log_every=10,
                   checkpoint_every=50)
  return c


def train_config(**overrides) -> ml_collections.ConfigDict:
  """`disa-train` options; defaults are the official recipe (LTH14/mar main_mar.py)."""
  c = ml_collections.ConfigDict()
  c.batch_size = 2048            # global batch (official: 32 GPUs x 64)
  c.num_steps = 250_000          # updates (the official recipe counts 400-800 epochs)
  c.blr = 1e-4                   # lr = blr * batch_size / 256 (unless lr > 0)
  c.lr = 0.0
  c.warmup_steps = 62_500        # official: 100 epochs of linear warmup
  c.lr_schedule = 'constant'     # constant | cosine
  c.min_lr = 0.0
  c.weight_decay = 0.02
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 3.0
  c.ema_rate = 0.9999
  c.seed = 1
  c.log_every = 100
  c.checkpoint_every = 5000
  c.keep_checkpoints = 2
  c.async_checkpointing = False
  c.tensorboard = True
  c.num_devices = 0              # 0 = all devices
  c.fsdp = 1                     # >1: shard parameters / optimizer over an fsdp mesh axis
  c.update(overrides)
  return c


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Training data: a moments cache (ArrayRecord) read with grain."""
  c = ml_collections.ConfigDict()
  c.kind = 'cache'               # cache (built by `disa-cache`) | digits (built on first use)
  c.cache_dir = ''
  c.split = 'train'
  c.flip_prob = 0.5              # use the cached h-flip moments with this probability
  c.latent_scale = 0.0           # 0 = the cache's (ImageNet KL-16: 0.2325)
  c.update(overrides)
  return c


# The bundled default model: a small class-conditional MAR trained on the embedded digits.
DIGITS_MODEL = dict(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=4,
                    decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4,
                    diffloss_d=2, diffloss_w=128, img_size=16, vae_stride=1, patch_size=2,
                    vae_embed_dim=1, buffer_size=16, class_num=10, diffusion_batch_mul=2,
                    attn_dropout=0.0, proj_dropout=0.0)
DIGITS_TOKEN_SCALE = 1.4


def bundled_digits_checkpoint() -> str:
  """Path of the digits model shipped inside the package."""
  from pathlib import Path

  return str(Path(__file__).resolve().parent / 'assets' / 'digits_mar')


def digits_config(*, tiny: bool = False) -> ml_collections.ConfigDict:
  """Config of the bundled digits model (sampling, demo and its `disa-train` recipe)."""
  c = ml_collections.ConfigDict()
  c.system = 'mar'
  c.name = 'digits' + ('-tiny' if tiny else '')
  model = dict(DIGITS_MODEL)
  if tiny:  # unit-test size, with the official dropout so that path is exercised
    model.update(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_d=1,
                 diffloss_w=32, attn_dropout=0.1, proj_dropout=0.1)
  c.model = model_config(**model)
  c.checkpoint = '' if tiny else bundled_digits_checkpoint()
  c.tokenizer = tokenizer_config(kind='pixels', scale=DIGITS_TOKEN_SCALE)
  c.sampling = sampling_config(num_iter=16, cfg=2.0, num_images=20, batch_size=20)
  c.runtime = runtime_config()
  c.data = data_config(kind='digits', cache_dir='~/.cache/disa_jax/digits_cache', flip_prob=0.0,
                       latent_scale=DIGITS_TOKEN_SCALE)
  # Sized for ~40 min on a shared 2-core CPU: peak lr 6e-4 (blr 2.4e-3 at batch 64),
  # cosine decay, a short EMA (the official 0.9999 averages over far more steps).
  c.train = train_config(batch_size=64, num_steps=1800, blr=2.4e-3, warmup_steps=100,
                         lr_schedule='cosine', min_lr=1e-5, ema_rate=0.995, log_every=50,
                         checkpoint_every=200, keep_checkpoints=2)
  if tiny:  # lr 1e-3, constant: the step's program does not depend on num_steps
    c.train.update(batch_size=16, num_steps=20, blr=0.016, warmup_steps=2,
                   lr_schedule='constant', log_every=5, checkpoint_every=10)
  return c
