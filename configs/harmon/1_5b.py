"""Harmon-1.5B (Qwen2.5-1.5B-Instruct + MAR-H) text-to-image at 512 px; official sampling defaults
(64 iterations, constant CFG 3.0, 100 diffusion steps); DiSA with --config.sampling.preset=disa.

Weights: harmon_1.5b.pth from the HF repo wusize/harmon, converted once:
  disa-convert harmon --torch-checkpoint harmon_1.5b.pth --out ckpt/harmon_1_5b
Sampling (prompts by --prompt, repeatable, or --prompts_file=FILE; a Qwen2.5 tokenizer.json):
  disa-sample --config=configs/harmon/1_5b.py --checkpoint=ckpt/harmon_1_5b --vae=ckpt/kl16 \\
      --tokenizer=tokenizer.json --prompt="a red apple on a wooden table" --out=outputs/harmon
  DiSA 50 -> 5: add --preset=disa --upper-steps=50 --lower-steps=5
Benchmark (baseline vs DiSA 100/50/25 -> 5, phase split):
  disa-bench --config=configs/harmon/1_5b.py --checkpoint=ckpt/harmon_1_5b --batch-size=16
  (random weights at the real widths, CPU: python -m disa_jax.systems.harmon.bench)
CPU stand-in (real head geometry, few layers, 256 px): --config=configs/harmon/1_5b.py:cpu
Unit-test size: --config=configs/harmon/1_5b.py:tiny
"""

from disa_jax.config import parse_arg
from disa_jax.systems.harmon.config import harmon_config


def get_config(arg=None):
  a = parse_arg(arg, cpu=False, tiny=False)
  return harmon_config('harmon_1_5b', cpu=a.cpu, tiny=a.tiny)
