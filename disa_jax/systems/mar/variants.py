"""MAR's architecture presets (LTH14/mar: MAR-B/L/H, head depth/width per the released
checkpoints), their CPU / unit-test stand-ins, and the config of the bundled digits model
(the installed package's default, so it lives here rather than only under configs/)."""

from __future__ import annotations

import ml_collections

from disa_jax.config import (
  base_config,
  data_config,
  model_config,
  runtime_config,
  sampling_config,
  tokenizer_config,
  train_config,
)

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


# The bundled default model: a small class-conditional MAR trained on the embedded digits.
DIGITS_MODEL = dict(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=4,
                    decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4,
                    diffloss_d=2, diffloss_w=128, img_size=16, vae_stride=1, patch_size=2,
                    vae_embed_dim=1, buffer_size=16, class_num=10, diffusion_batch_mul=2,
                    attn_dropout=0.0, proj_dropout=0.0)
DIGITS_TOKEN_SCALE = 1.4


def bundled_digits_checkpoint() -> str:
  """Path of the digits model shipped inside the package."""
  from disa_jax.systems.common.config import bundled_checkpoint

  return bundled_checkpoint('digits_mar')


def digits_config(*, tiny: bool = False) -> ml_collections.ConfigDict:
  """Config of the bundled digits model (sampling, demo and its `disa-train` recipe)."""
  c = base_config('mar', 'digits' + ('-tiny' if tiny else ''))
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
  c.lock()
  return c


def imagenet_config(variant: str, *, cpu: bool = False, tiny: bool = False
                    ) -> ml_collections.ConfigDict:
  """The config of an official ImageNet-256 MAR variant ('mar_base' | 'mar_large' | 'mar_huge'):
  KL-16 tokenizer, DiSA sampling at the paper's CFG (`PAPER_DISA_CFG`), the official training
  recipe; `cpu` / `tiny` swap in the small stand-in architectures (random weights, no VAE).
  `configs/mar/{base,large,huge}.py` are thin files over this one builder."""
  small = cpu or tiny
  c = base_config('mar', variant + ('-tiny' if tiny else '-cpu' if cpu else ''))
  model = dict(MAR_VARIANTS[variant])
  if tiny:
    model.update(TINY_MODEL)
  elif cpu:
    model.update(CPU_MODEL)
  c.model = model_config(**model)
  c.checkpoint = ''              # directory written by `disa-convert mar` or `disa-train`
  c.tokenizer = tokenizer_config(kind='none' if small else 'kl16')
  c.sampling = sampling_config(cfg=PAPER_DISA_CFG[variant])
  if small:
    c.sampling.update(num_images=4, batch_size=4)
  if tiny:
    c.sampling.update(num_iter=8, upper_steps=10, lower_steps=3, cfg=2.0)
  c.runtime = runtime_config()
  c.data = data_config()
  c.train = train_config()
  if small:
    c.train.update(batch_size=8, num_steps=100, warmup_steps=10, log_every=10,
                   checkpoint_every=50)
  c.lock()
  return c


# The bundled default model: a small class-conditional MAR on 5,000 real MNIST digits
# (`disa_jax.data.mnist`): 32x32 pixels, 4x4 patches -> 64 tokens of 16 values (KL-16's channel
# count), buffer 16 (the official 64 of 256 tokens), the official diffusion_batch_mul 4.
MNIST_MODEL = dict(encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
                   decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
                   diffloss_d=2, diffloss_w=256, img_size=32, vae_stride=1, patch_size=4,
                   vae_embed_dim=1, buffer_size=16, class_num=10, diffusion_batch_mul=4,
                   attn_dropout=0.0, proj_dropout=0.0)
MNIST_TOKEN_SCALE = 1.8


def bundled_mnist_checkpoint() -> str:
  """Path of the MNIST model shipped inside the package (the CLIs' default)."""
  from disa_jax.systems.common.config import bundled_checkpoint

  return bundled_checkpoint('mnist_mar')


def mnist_config(*, tiny: bool = False) -> ml_collections.ConfigDict:
  """Config of the bundled MNIST model (default of disa-sample / disa-demo; its recipe)."""
  c = base_config('mar', 'mnist' + ('-tiny' if tiny else ''))
  model = dict(MNIST_MODEL)
  if tiny:  # unit-test size
    model.update(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_d=1,
                 diffloss_w=32, diffusion_batch_mul=1)
  c.model = model_config(**model)
  c.checkpoint = '' if tiny else bundled_mnist_checkpoint()
  c.tokenizer = tokenizer_config(kind='pixels', scale=MNIST_TOKEN_SCALE)
  c.sampling = sampling_config(num_iter=16, cfg=2.0, num_images=20, batch_size=20)
  c.runtime = runtime_config()
  c.data = data_config(kind='mnist', cache_dir='~/.cache/disa_jax/mnist_cache', flip_prob=0.0,
                       latent_scale=MNIST_TOKEN_SCALE)
  # Peak lr 6e-4 (blr 2.4e-3 at batch 64) after a linear warmup, then a cosine decay (the head
  # reaches the precision the first un-clamped step needs only as the lr falls), EMA 0.995
  # (~200-step window); 30 % of the head's rows at t = 999 (`last_t_fraction`, docs/benchmarks.md).
  c.train = train_config(batch_size=64, num_steps=2000, blr=2.4e-3, warmup_steps=100,
                         lr_schedule='cosine', min_lr=1e-5, ema_rate=0.995, log_every=25,
                         last_t_fraction=0.3, checkpoint_every=100, keep_checkpoints=40)
  if tiny:
    c.train.update(batch_size=16, num_steps=20, blr=0.016, warmup_steps=2,
                   lr_schedule='constant', log_every=5, checkpoint_every=10)
  c.lock()
  return c
