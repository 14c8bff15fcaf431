"""xAR-L (official architecture) sampled with DiSA by default (50 -> 15 flow steps over cells).

Official weights (xAR-L.pth from huggingface.co/OliverRen/xAR), converted once:
  disa-convert xar --torch-checkpoint xAR-L.pth --out ckpt/xar_l
  disa-sample --config=configs/xar/l.py --checkpoint=ckpt/xar_l --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/xar_l
Official xAR schedule (same steps in every cell): --config.sampling.preset=baseline
CPU-sized stand-in with random weights: --config=configs/xar/l.py:cpu
Unit-test size: --config=configs/xar/l.py:tiny
Python: disa_jax.systems.xar.config.xar_config('L', arg).
"""

from disa_jax.systems.xar.config import xar_config


def get_config(arg=None):
  c = xar_config('L', arg)
  c.lock()
  return c
