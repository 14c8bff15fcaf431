"""Per-system packages, found by name: `disa_jax.systems.<config.system>`."""
