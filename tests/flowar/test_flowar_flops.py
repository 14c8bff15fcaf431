"""The FlowAR FLOP model vs XLA's cost analysis of the compiled trunk step / head evaluation,
and the baseline/DiSA ratios it predicts for the official shapes."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from disa_jax.systems.flowar.config import VARIANTS, FlowARConfig
from disa_jax.systems.flowar.flops import head_eval_flops, run_flops, trunk_pass_flops
from disa_jax.systems.flowar.model import FlowAR
from disa_jax.systems.flowar.steps import preset_steps


def xla_flops(fn, *args):
  ca = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((ca[0] if isinstance(ca, list) else ca)['flops'])


@pytest.mark.parametrize('cross', [False, True])
def test_flop_model_matches_xla(cross):
  cfg = FlowARConfig(width=256, encoder_depth=1, decoder_depth=1, heads=4, head_width=256,
                     head_depth=2, head_cross=cross, class_num=10)
  graphdef, state = nnx.split(FlowAR(cfg, rngs=nnx.Rngs(0)))
  s, n = 4, 256
  head = xla_flops(lambda st, x, t, z: nnx.merge(graphdef, st).velocity(x, t, z, s), state,
                   jnp.ones((1, n, 16)), jnp.ones((1,), jnp.int32), jnp.ones((1, n, 256)))
  assert head == pytest.approx(head_eval_flops(cfg, s), rel=0.05)
  hd = cfg.head_dim
  cache = tuple(tuple((jnp.ones((1, 4, 85, hd)), jnp.ones((1, 4, 85, hd))) for _ in range(1))
                for _ in range(2))
  trunk = xla_flops(lambda st, x, c, k: nnx.merge(graphdef, st).trunk_step(x, c, s, k)[0], state,
                    jnp.ones((1, n, 256)), jnp.ones((1, 256)), cache)
  assert trunk == pytest.approx(trunk_pass_flops(cfg, s), rel=0.1)


def test_predicted_disa_speedups():
  ratios = {}
  for v in 'SLH':
    b = run_flops(VARIANTS[v], preset_steps('baseline', v), cfg_scale=2.0)
    d = run_flops(VARIANTS[v], preset_steps('disa', v), cfg_scale=2.0)
    assert b['trunk'] == d['trunk']                       # DiSA only changes the head
    ratios[v] = b['total'] / d['total']
  assert ratios['S'] == pytest.approx(1.54, abs=0.01)
  assert ratios['L'] == pytest.approx(1.59, abs=0.01)
  assert ratios['H'] == pytest.approx(2.82, abs=0.01)
