"""disa_jax: MAR (masked autoregressive generation with per-token diffusion) + DiSA in JAX/Flax.

Public API:
  step_schedule(strategy, num_iter, upper, lower) -> list[int]
  respaced_timesteps(num_steps, max_timestep=None) -> np.ndarray
  sample_head(model, z, key, *, num_steps, temperature=1.0, cfg=1.0, max_timestep=None)
  generate(model, labels, key, *, num_iter, cfg, cfg_schedule, temperature, steps,
           max_timestep=None) -> tokens [B, L, C]
  MAR, MARConfig, Sampler, load_mar
  AutoencoderKL, VAEConfig, load_vae   (KL-16 VAE: encode -> (mean, logvar), decode)
"""

__version__ = '0.1.0'

from disa_jax.checkpoint import load_mar, load_vae
from disa_jax.diffusion.ddpm import sample_head
from disa_jax.diffusion.gaussian import respaced_timesteps
from disa_jax.schedules import resolve_steps, step_schedule
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.systems.mar.sampling import Sampler, generate
from disa_jax.tokenizers.kl16 import AutoencoderKL, VAEConfig

__all__ = ['MAR', 'AutoencoderKL', 'MARConfig', 'Sampler', 'VAEConfig', 'generate', 'load_mar',
           'load_vae', 'resolve_steps', 'respaced_timesteps', 'sample_head', 'step_schedule']
