"""The strict config base for `configs/<system>/*.py` (ml_collections, big_vision style).

A config file defines `get_config(arg)`; `arg` is the text after ':' in
`--config=configs/mar/base.py:cpu`, parsed by `parse_arg` into typed options. Every field can
be overridden on the command line: `--config.sampling.num_iter=256`; a field the config does not
have is an error (configs are locked). Sections, each built by one function here:
  system, name   `base_config`: which package under `disa_jax/systems` runs it
  model          architecture (`model_config`; MAR also keeps its compute dtype here)
  tokenizer      tokens <-> images (`tokenizer_config`)
  sampling       AR stages, DiSA steps, CFG, number of images (`sampling_config`)
  runtime        buckets, precision, compilation cache, devices (`runtime_config`)
  train, data    `disa-train` (`train_config`, `data_config`)
The MAR architecture tables and the bundled digits config live in `disa_jax.systems.mar.variants`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SECTIONS = ('system', 'name', 'model', 'checkpoint', 'tokenizer', 'sampling', 'runtime', 'train',
            'data')


def base_config(system: str, name: str) -> ml_collections.ConfigDict:
  """The start of every config: its system (`disa_jax.systems.<system>`) and name. Configs are
  locked when returned (`get_config` ends with `c.lock()`; the command line locks them too),
  so a misspelt field or `--config.a.b` override is an error, not a silently new key."""
  c = ml_collections.ConfigDict()
  c.system = system
  c.name = name
  return c


def model_config(**fields) -> ml_collections.ConfigDict:
  """Every architecture field of `config.system`'s model config (MAR: `MARConfig`), so each is
  overridable from the command line."""
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
  c.solver = 'ddpm'          # head solver: ddpm (official) | ddim | dpmpp_2m | dpmpp_2m_sde
  c.eta = 0.0                # DDIM noise scale (0 = deterministic)
  c.cache = ''               # MAR backbone cache: '' / none | lazymar[:k=v,...] (docs/caching.md)
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
  c.head_steps = 'traced'        # traced: a head per rows bucket; exact: per (steps, rows)
  c.matmul_precision = ''        # '' backend default, or 'highest' (parity runs)
  c.compilation_cache = '~/.cache/disa_jax/xla'   # persistent XLA cache ('' disables)
  c.trace_cache = True           # keep traces beside a local XLA cache (engine/aot.py)
  c.compile_threads = 2          # XLA compiles / cache loads in parallel threads
  c.background_compile = True    # sample while later buckets compile (disa-bench: off)
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
  c.last_t_fraction = 0.0        # MAR: rows trained at t = T-1 (0 = official uniform t)
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


def mar_config(variant: str, *, cpu: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """`configs/mar/<base|large|huge>.py` of a repository checkout (tests, notebooks)."""
  import importlib.util
  import os

  from disa_jax.errors import UserError

  short = variant.removeprefix('mar_')
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'mar', f'{short}.py')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: mar_config reads the configs/ folder of a repository '
                    'checkout')
  spec = importlib.util.spec_from_file_location(f'configs_mar_{short}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  arg = ','.join(k for k, v in (('cpu', cpu), ('tiny', tiny)) if v)
  return module.get_config(arg)


_MAR_NAMES = ('MAR_VARIANTS', 'PAPER_CFG', 'PAPER_DISA_CFG', 'PAPER_BATCH', 'CPU_MODEL',
              'TINY_MODEL', 'DIGITS_MODEL', 'DIGITS_TOKEN_SCALE', 'bundled_digits_checkpoint',
              'digits_config', 'MNIST_MODEL', 'MNIST_TOKEN_SCALE', 'bundled_mnist_checkpoint',
              'mnist_config')


def __getattr__(name):   # names that moved to disa_jax.systems.mar.variants
  if name in _MAR_NAMES:
    from disa_jax.systems.mar import variants

    return getattr(variants, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
