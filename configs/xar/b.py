"""xAR-B (official architecture) sampled with DiSA by default (50 -> 15 flow steps over cells).

Official weights (xAR-B.pth from huggingface.co/OliverRen/xAR), converted once:
  disa-convert xar --torch-checkpoint xAR-B.pth --out ckpt/xar_b
  disa-sample --config=configs/xar/b.py --checkpoint=ckpt/xar_b --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/xar_b
Official xAR schedule (same steps in every cell): --config.sampling.preset=baseline
CPU-sized stand-in with random weights: --config=configs/xar/b.py:cpu
Unit-test size: --config=configs/xar/b.py:tiny
Baseline vs DiSA side by side: disa-bench --config=configs/xar/b.py:cpu --batch_size=4 --phases
Train a small xAR on the bundled digits (noisy-context flow matching, systems/xar/train.py):
  disa-train --config=configs/xar/b.py:tiny,digits --workdir=outputs/xar_digits \
      --export=outputs/xar_digits/model
Python: disa_jax.systems.xar.config.xar_config('B', arg).
"""

from disa_jax.systems.xar.config import xar_config


def get_config(arg=None):
  c = xar_config('B', arg)
  c.lock()
  return c
