"""FlowAR-H (official architecture) sampled with DiSA by default (upper -> 15 flow steps).

Official weights (FlowAR-H.pth from huggingface.co/OliverRen/FlowAR), converted once:
  disa-convert flowar --torch-checkpoint FlowAR-H.pth --out ckpt/flowar_h
  disa-sample --config=configs/flowar/h.py --checkpoint=ckpt/flowar_h --vae=ckpt/kl16 \
      --num_images=64 --out=outputs/flowar_h
Official schedule (50 steps at every scale): --config.sampling.preset=baseline
CPU-sized stand-in with random weights (same 341-token layout): --config=configs/flowar/h.py:cpu
Unit-test size: --config=configs/flowar/h.py:tiny
Python: disa_jax.systems.flowar.config.flowar_config('H', arg).
"""

from disa_jax.systems.flowar.config import flowar_config


def get_config(arg=None):
  return flowar_config('H', arg)
