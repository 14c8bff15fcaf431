"""MAR-B (208M), official architecture (LTH14/mar), sampled with DiSA by default.

Official weights, converted once (see README):
  disa-sample --config=configs/mar/base.py --checkpoint=ckpt/mar_base --vae=ckpt/kl16 \
      --num-images=64 --out=outputs/mar_base
Original MAR schedule (K=256, 100 steps, no clamp):
  disa-sample --config=configs/mar/base.py --preset=baseline --num-iter=256 --upper-steps=100 ...
CPU-sized stand-in with random weights (same 256-token layout, tiny widths):
  disa-sample --config=configs/mar/base.py:cpu --out=outputs/mar_base_cpu
Unit-test size (16 tokens): --config=configs/mar/base.py:tiny

Sections: model (architecture; `dtype` / `attn_splits` are runtime knobs of the compute, not
of the weights), tokenizer (tokens -> images), sampling (AR stages, DiSA steps, CFG, images),
runtime (buckets, precision, caches, devices), train + data (`disa-train`).
"""

from disa_jax.config import (
  base_config,
  data_config,
  model_config,
  parse_arg,
  runtime_config,
  sampling_config,
  tokenizer_config,
  train_config,
)
from disa_jax.systems.mar.variants import CPU_MODEL, MAR_VARIANTS, TINY_MODEL

VARIANT = 'mar_base'
PAPER_DISA_CFG = 2.9      # linear CFG scale of the DiSA paper for this variant
PAPER_BATCH = 256        # per-device evaluation batch of the paper


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  small = a.cpu or a.tiny
  c = base_config('mar', VARIANT + ('-tiny' if a.tiny else '-cpu' if a.cpu else ''))
  model = dict(MAR_VARIANTS[VARIANT])
  if a.tiny:
    model.update(TINY_MODEL)
  elif a.cpu:
    model.update(CPU_MODEL)
  c.model = model_config(**model)
  c.checkpoint = ''              # directory written by `disa-convert mar` or `disa-train`
  c.tokenizer = tokenizer_config(kind='none' if small else 'kl16')
  c.sampling = sampling_config(cfg=PAPER_DISA_CFG)
  if small:
    c.sampling.update(num_images=4, batch_size=4)
  if a.tiny:
    c.sampling.update(num_iter=8, upper_steps=10, lower_steps=3, cfg=2.0)
  c.runtime = runtime_config()
  c.data = data_config()
  c.train = train_config()
  if small:
    c.train.update(batch_size=8, num_steps=100, warmup_steps=10, log_every=10,
                   checkpoint_every=50)
  c.lock()
  return c
