"""FlowAR-L (official architecture) sampled with DiSA by default (upper -> 15 flow steps).

Official weights (FlowAR-L.pth from huggingface.co/OliverRen/FlowAR), converted once:
  disa-convert flowar --torch-checkpoint FlowAR-L.pth --out ckpt/flowar_l
  disa-sample --config=configs/flowar/l.py --checkpoint=ckpt/flowar_l --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/flowar_l
Official schedule (25 steps at every scale): --config.sampling.preset=baseline
CPU-sized stand-in with random weights (same 341-token layout): --config=configs/flowar/l.py:cpu
Unit-test size: --config=configs/flowar/l.py:tiny
Python: disa_jax.systems.flowar.config.flowar_config('L', arg).
"""

from disa_jax.systems.flowar.config import flowar_config


def get_config(arg=None):
  return flowar_config('L', arg)
