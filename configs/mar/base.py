"""MAR-B (208M), official architecture (LTH14/mar), sampled with DiSA by default.

Official weights, converted once (see README):
  disa-sample --config=configs/mar/base.py --checkpoint=ckpt/mar_base --vae=ckpt/kl16 \
      --num-images=64 --out=outputs/mar_base
Original MAR schedule (K=256, 100 steps, no clamp):
  disa-sample --config=configs/mar/base.py --preset=baseline --num-iter=256 --upper-steps=100 ...
CPU-sized stand-in with random weights (same 256-token layout, tiny widths):
  disa-sample --config=configs/mar/base.py:cpu --out=outputs/mar_base_cpu
Unit-test size (16 tokens): --config=configs/mar/base.py:tiny

Built by `disa_jax.systems.mar.variants.imagenet_config` (shared by base / large / huge).
Sections: model (architecture; `dtype` / `attn_splits` are runtime knobs of the compute, not
of the weights), tokenizer (tokens -> images), sampling (AR stages, DiSA steps, CFG, images),
runtime (buckets, precision, caches, devices), train + data (`disa-train`).
"""

from disa_jax.config import parse_arg
from disa_jax.systems.mar.variants import PAPER_BATCH, PAPER_DISA_CFG, imagenet_config

VARIANT = 'mar_base'
PAPER_DISA_CFG = PAPER_DISA_CFG[VARIANT]   # linear CFG scale of the DiSA paper for this variant
PAPER_BATCH = PAPER_BATCH[VARIANT]         # per-device evaluation batch of the paper


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  return imagenet_config(VARIANT, cpu=a.cpu, tiny=a.tiny)
