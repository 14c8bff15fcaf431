"""Sampling engine shared by systems: batching loops, run statistics, labels."""
