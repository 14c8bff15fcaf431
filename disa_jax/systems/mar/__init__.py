"""MAR (LTH14/mar) as a disa_jax system: model, sampling loop, bucket plan, FLOP model,
converter rules; `SYSTEM` is its `disa_jax.systems.base.System`."""

from disa_jax.systems.mar.system import SYSTEM

__all__ = ['SYSTEM']
