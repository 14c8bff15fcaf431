"""The bundled default model: a small class-conditional MAR on the embedded digits dataset.

scikit-learn's 1797 handwritten digits, upsampled to 16x16, identity "pixels" tokenizer with
2x2 patches (64 tokens of 4 values, scale 1.4), 30 images per class held out for evaluation.

Reproduce the shipped checkpoint (disa_jax/assets/digits_mar) on a CPU:
  disa-train --config=configs/mar/digits.py --workdir=runs/digits \
      --export=disa_jax/assets/digits_mar --overwrite-export
Sample from it (this config is also the default of disa-sample):
  disa-sample --config=configs/mar/digits.py --num-images=20 --out=outputs/digits
Compare the original MAR schedule with DiSA: disa-demo
Unit-test size (random init, 20 steps): --config=configs/mar/digits.py:tiny

The content lives in `disa_jax.systems.mar.variants.digits_config` because the installed
package needs it without a repository checkout: it is `disa-sample`'s and `disa-demo`'s
built-in default (the config of the model shipped in the package).
"""

from disa_jax.config import parse_arg
from disa_jax.systems.mar.variants import digits_config


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  return digits_config(tiny=a.tiny)
