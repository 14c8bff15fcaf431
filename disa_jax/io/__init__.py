"""Model directories and run outputs on disk."""
