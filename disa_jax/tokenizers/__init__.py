"""Tokenizers: image (KL-16 VAE, pixels, D-AR) and text."""
