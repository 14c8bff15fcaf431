"""The bundled FlowAR digits model: a small class-conditional FlowAR on the embedded digits.

scikit-learn's handwritten digits upsampled to 16x16, one pixel per token (1 channel, scale
1.4); the official next-scale layout (1, 2, 4, 8, 16 tokens per side), the CPU stand-in's
trunk (width 64, 2 + 2 blocks) and a 64-wide self-attention flow head (0.55M parameters).

Reproduce the shipped checkpoint (disa_jax/assets/digits_flowar, 1000 steps) on a CPU (about
40 min alone on 2 cores at its 0.43 steps/s; 55 min measured sharing them with other work):
  disa-train --config=configs/flowar/digits.py --workdir=runs/flowar_digits \\
      --export=disa_jax/assets/digits_flowar --overwrite-export
Sample from it (DiSA by default; the official schedule: --config.sampling.preset=baseline):
  disa-sample --config=configs/flowar/digits.py --num-images=20 --out=outputs/flowar_digits
Baseline vs DiSA next to MAR: disa-demo

The content lives in `disa_jax.systems.flowar.config.digits_config` (the installed package's
demo needs it without a repository checkout).
"""

from disa_jax.errors import UserError
from disa_jax.systems.flowar.config import digits_config


def get_config(arg=None):
  if arg:
    raise UserError(f'configs/flowar/digits.py takes no argument, got {arg!r}')
  return digits_config()
