"""Harmon image post-processing: clamp(127.5 x + 128) with truncation (not MAR's rounding),
the latent scale and layout, and grid tiling."""

import numpy as np

from disa_jax.systems.harmon.images import grid_image, to_uint8, tokens_to_latent


def test_post_processing_truncates():
  x = np.array([-2.0, -1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(to_uint8(x), [0, 0, 0, 128, 191, 255, 255, 255])
  # 127.5 * 0.5 + 128 = 191.75 -> 191 (rounding would give 192)
  assert to_uint8(np.float32(0.5)) == 191


def test_latent_layout_and_scale():
  tokens = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  lat = np.asarray(tokens_to_latent(tokens, 2))
  assert lat.shape == (2, 2, 2, 3)
  np.testing.assert_allclose(lat[1, 1, 0] * 0.2325, tokens[1, 2], rtol=1e-6)


def test_grid():
  imgs = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(3)])
  g = grid_image(imgs, 2)
  assert g.shape == (4, 6, 3) and g[0, 3, 0] == 1 and g[2, 0, 0] == 2 and g[3, 5, 0] == 0
