"""Harmon-0.5B (Qwen2.5-0.5B-Instruct + MAR-B) text-to-image at 512 px; official sampling defaults
(64 iterations, constant CFG 3.0, 100 diffusion steps); DiSA with --config.sampling.preset=disa.

Weights: harmon_0.5b.pth from the HF repo wusize/harmon, converted once:
  python -c "from disa_jax.systems.harmon.convert import convert; \\
             convert('harmon_0.5b.pth', 'ckpt/harmon_0_5b')"
Sampling (CLI wiring pending; the Python API is disa_jax.systems.harmon.HarmonSampler):
  disa-sample --config=configs/harmon/0_5b.py --checkpoint=ckpt/harmon_0_5b --vae=ckpt/kl16 \
      --tokenizer=tokenizer.json --prompt="a red apple on a wooden table"
Benchmark (random weights, CPU): python -m disa_jax.systems.harmon.bench --variant=harmon_0_5b
CPU stand-in (real head geometry, few layers, 256 px): --config=configs/harmon/0_5b.py:cpu
Unit-test size: --config=configs/harmon/0_5b.py:tiny
"""

from disa_jax.config import parse_arg
from disa_jax.systems.harmon.config import harmon_config


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  return harmon_config('harmon_0_5b', cpu=a.cpu, tiny=a.tiny)
