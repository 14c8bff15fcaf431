"""MAR (LTH14/mar) as a disa_jax system."""
