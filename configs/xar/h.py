"""xAR-H (official architecture) sampled with DiSA by default (50 -> 15 flow steps over cells).

Official weights (xAR-H.pth from huggingface.co/OliverRen/xAR), converted once:
  disa-convert xar --torch-checkpoint xAR-H.pth --out ckpt/xar_h
  disa-sample --config=configs/xar/h.py --checkpoint=ckpt/xar_h --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/xar_h
Official xAR schedule (same steps in every cell): --config.sampling.preset=baseline
CPU-sized stand-in with random weights: --config=configs/xar/h.py:cpu
Unit-test size: --config=configs/xar/h.py:tiny
Python: disa_jax.systems.xar.config.xar_config('H', arg).
"""

from disa_jax.systems.xar.config import xar_config


def get_config(arg=None):
  c = xar_config('H', arg)
  c.lock()
  return c
