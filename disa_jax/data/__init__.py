"""Data: VAE-moment caches in ArrayRecord, the embedded digits dataset, grain input pipelines."""
