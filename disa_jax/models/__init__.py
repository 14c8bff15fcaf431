"""Flax NNX modules: the MAR transformer, its diffusion head, and shared layers."""

from disa_jax.models.diffloss import DiffLoss, SimpleMLPAdaLN
from disa_jax.models.mar import MAR, MARConfig, count_params

__all__ = ['MAR', 'MARConfig', 'DiffLoss', 'SimpleMLPAdaLN', 'count_params']
