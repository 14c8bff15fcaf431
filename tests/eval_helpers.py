"""Helpers of the `disa-eval` subprocess tests of FlowAR and xAR (`flowar/test_flowar_eval.py`,
`xar/test_xar_eval.py`): a small random KL-16 VAE model directory, the eval command run in a
subprocess, the saved PNGs read back."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vae_dir(path):
  """A random KL-16 VAE model directory (reduced width, the official 16x downsampling)."""
  from flax import nnx

  from disa_jax.checkpoint import save_model
  from disa_jax.tokenizers.kl16 import AutoencoderKL, VAEConfig

  cfg = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_levels=())
  return save_model(path, AutoencoderKL(cfg, rngs=nnx.Rngs(0)), kind='vae',
                    model_config=cfg.to_dict())


def run_eval(*args):
  """`python -m disa_jax.cli.eval ARGS` from the repo root on one CPU device."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  return subprocess.run([sys.executable, '-m', 'disa_jax.cli.eval', *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def pngs(d):
  """(sorted file names, stacked uint8 images) of the PNGs in directory `d`."""
  from PIL import Image

  names = sorted(os.listdir(d))
  return names, np.stack([np.asarray(Image.open(d / n)) for n in names])
