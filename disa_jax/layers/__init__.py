"""Shared neural layers (attention, blocks, norms, RoPE, adaLN, LLM decoders)."""
