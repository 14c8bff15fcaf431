"""Per-token heads (small networks a diffusion or flow solver evaluates per token)."""
