"""Training MAR (LTH14/mar `engine_mar.py`, `main_mar.py`) in JAX: state, step, loop."""
