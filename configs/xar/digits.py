"""The bundled xAR digits model: a small class-conditional xAR on the embedded digits.

scikit-learn's handwritten digits upsampled to 16x16, one pixel per token (1 channel, scale
1.4), generated in the official 4 cells of 8x8 tokens; the CPU stand-in's transformer
(width 128, 2 + 2 blocks, 1.3M parameters) is the whole flow network.

Reproduce the shipped checkpoint (disa_jax/assets/digits_xar) on a CPU (about 35 min alone on
2 cores, estimated from its step rate; 60 min measured sharing them with the FlowAR run):
  disa-train --config=configs/xar/digits.py --workdir=runs/xar_digits \\
      --export=disa_jax/assets/digits_xar --overwrite-export
Sample from it (DiSA by default; the official schedule: --config.sampling.preset=baseline):
  disa-sample --config=configs/xar/digits.py --num-images=20 --out=outputs/xar_digits
Baseline vs DiSA next to MAR: disa-demo

The content lives in `disa_jax.systems.xar.config.digits_config` (the installed package's
demo needs it without a repository checkout).
"""

from disa_jax.errors import UserError
from disa_jax.systems.xar.config import digits_config


def get_config(arg=None):
  if arg:
    raise UserError(f'configs/xar/digits.py takes no argument, got {arg!r}')
  return digits_config()
