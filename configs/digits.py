"""The bundled default model: a small class-conditional MAR on the embedded digits dataset.

scikit-learn's 1797 handwritten digits, upsampled to 16x16, identity "pixels" tokenizer with
2x2 patches (64 tokens of 4 values, scale 1.4), 30 images per class held out for evaluation.

Reproduce the shipped checkpoint (disa_jax/assets/digits_mar) on a CPU:
  disa-train --config=configs/digits.py --workdir=runs/digits \
      --export=disa_jax/assets/digits_mar --overwrite-export
Sample from it (this config is also the default of disa-sample):
  disa-sample --config=configs/digits.py --num-images=20 --out=outputs/digits
Compare the original MAR schedule with DiSA: disa-demo
Unit-test size (random init, 20 steps): --config=configs/digits.py:tiny
"""

from disa_jax.config import digits_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  return digits_config(tiny=a.tiny)
