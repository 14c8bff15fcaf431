"""FlowAR-S (official architecture) sampled with DiSA by default (upper -> 15 flow steps).

Official weights (FlowAR-S.pth from huggingface.co/OliverRen/FlowAR), converted once:
  disa-convert flowar --torch-checkpoint FlowAR-S.pth --out ckpt/flowar_s
  disa-sample --config=configs/flowar/s.py --checkpoint=ckpt/flowar_s --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/flowar_s
Official schedule (25 steps at every scale): --config.sampling.preset=baseline
CPU-sized stand-in with random weights (same 341-token layout): --config=configs/flowar/s.py:cpu
Unit-test size: --config=configs/flowar/s.py:tiny
Python: disa_jax.systems.flowar.config.flowar_config('S', arg).
"""

from disa_jax.systems.flowar.config import flowar_config


def get_config(arg=None):
  return flowar_config('S', arg)
