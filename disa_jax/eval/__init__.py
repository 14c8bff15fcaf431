"""Evaluation: Frechet distances, Inception FID/IS, quality scores, the paper's evidence."""
