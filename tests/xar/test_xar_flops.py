"""The xAR FLOP model: spec §6.5 token counts, the matmul part against a direct count of the
tiny model's Linear shapes, and the predicted DiSA speedups."""

import pytest

from disa_jax.systems.xar.config import TINY, VARIANTS
from disa_jax.systems.xar.flops import pass_flops, predicted_speedup, run_flops


def test_token_and_evaluation_counts_match_the_spec():
  b = VARIANTS['B']
  assert run_flops(b, [40] * 4)['tokens'] == 10_432
  assert run_flops(b, [50] * 4)['tokens'] == 12_992
  r = run_flops(b, [50, 38, 26, 15])
  assert (r['tokens'], r['evaluations']) == (8_448, 129)


def test_pass_flops_counts_every_linear():
  c = TINY
  d, f, layers = c.width, c.mlp_hidden, c.encoder_depth + c.decoder_depth
  q, k = 128, 192
  linear = layers * (q * 2 * (3 * d * d + d * d + 3 * d * f) + 2 * 2 * 6 * d * d)
  attn = layers * q * 4 * k * d
  outside = q * 2 * (16 * d + d * d + d * 16) + 2 * 2 * (256 * d + d * d)
  assert pass_flops(c, q, k) == linear + attn + outside


def test_predicted_speedups():
  # the evaluation ratios are 160 / 129 = 1.240 (B) and 200 / 129 = 1.550 (L / H); the extra
  # context tokens of the first passes and the longer caches of late cells move the FLOP
  # ratio slightly: 1.242 (B), 1.545 (L), 1.543 (H)
  b = predicted_speedup(VARIANTS['B'], [40] * 4, [50, 38, 26, 15])
  h = predicted_speedup(VARIANTS['H'], [50] * 4, [50, 38, 26, 15])
  assert 1.235 < b < 1.25 and 1.535 < h < 1.55
  assert h == pytest.approx(predicted_speedup(VARIANTS['L'], [50] * 4, [50, 38, 26, 15]),
                            rel=0.02)
