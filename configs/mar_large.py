"""MAR-Large (official architecture) sampled with DiSA by default.

Official weights, converted once (see README):
  disa-sample --config=configs/mar_large.py --checkpoint=ckpt/mar_large --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/mar_large
Original MAR schedule (K=256, 100 steps, no clamp):
  disa-sample --config=configs/mar_large.py --preset=mar --config.sampling.num_iter=256 \
      --config.sampling.upper_steps=100 ...
CPU-sized stand-in with random weights (same 256-token layout, tiny widths):
  disa-sample --config=configs/mar_large.py:cpu --out=outputs/mar_large_cpu
Unit-test size (16 tokens): --config=configs/mar_large.py:tiny
"""

from disa_jax.config import mar_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  return mar_config('mar_large', cpu=a.cpu, tiny=a.tiny)
