"""Flax NNX modules: the MAR transformer, its diffusion head, shared layers, the KL-16 VAE."""

from disa_jax.models.diffloss import DiffLoss, SimpleMLPAdaLN
from disa_jax.models.mar import MAR, MARConfig, count_params
from disa_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = ['MAR', 'MARConfig', 'AutoencoderKL', 'VAEConfig', 'DiffLoss', 'SimpleMLPAdaLN',
           'count_params']
