"""Shared FlowAR/xAR layers vs the PyTorch reference: RMSNorm, exact-GELU gated MLP, 2-D RoPE
(tables, buffers, rotation convention), timestep embedding, and the next-scale input
(bicubic up to 16x16, then area) vs torch.nn.functional.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from disa_jax.layers.adaln import timestep_embedding
from disa_jax.layers.mlp import GatedMLP, gated_hidden
from disa_jax.layers.norms import RMSNorm
from disa_jax.layers.rope import apply_rope, rope_freqs, scale_rope_table
from disa_jax.systems.flowar.next_scale import next_scale_input, next_scale_matrix
from reference import flowar as ref


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_rms_norm_matches_reference():
  x = np.random.default_rng(0).normal(size=(3, 5, 32)).astype(np.float32) * 3
  w = np.random.default_rng(1).normal(size=32).astype(np.float32)
  t = ref.RMSNorm(32, weight=True)
  with torch.no_grad():
    t.weight.copy_(torch.from_numpy(w))
  n = RMSNorm(32, use_weight=True)
  n.scale[...] = jnp.asarray(w)
  assert rel(n(jnp.asarray(x)), t(torch.from_numpy(x)).detach()) < 1e-6
  assert RMSNorm(32).scale is None


def test_gated_mlp_uses_exact_gelu_on_fc1_g():
  assert [gated_hidden(d) for d in (768, 1024, 1280, 1536)] == [2048, 2730, 3413, 4096]
  torch.manual_seed(0)
  t = ref.GatedMLP(16, 40)
  with torch.no_grad():
    for p in t.parameters():
      p.normal_(0, 0.4)
  m = GatedMLP(16, 40, rngs=nnx.Rngs(0))
  for name in ('fc1_g', 'fc1_x', 'fc2'):
    lin = getattr(t, name)
    getattr(m, name).kernel[...] = jnp.asarray(lin.weight.detach().numpy().T)
    getattr(m, name).bias[...] = jnp.asarray(lin.bias.detach().numpy())
  x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
  want = t(torch.from_numpy(x)).detach().numpy()
  with jax.default_matmul_precision('highest'):
    assert rel(m(jnp.asarray(x)), want) < 1e-6
    # the tanh approximation or a SiLU gate would be far off
    tanh = m.fc2(jax.nn.gelu(m.fc1_g(jnp.asarray(x)), approximate=True) * m.fc1_x(jnp.asarray(x)))
    silu = m.fc2(jax.nn.silu(m.fc1_g(jnp.asarray(x))) * m.fc1_x(jnp.asarray(x)))
  assert rel(tanh, want) > 1e-4 and rel(silu, want) > 1e-2


@pytest.mark.parametrize('hd', [64, 96, 80])
def test_rope_freqs_equal_torch_buffer(hd):
  np.testing.assert_allclose(rope_freqs(hd), ref.Rope(hd // 2).freqs.numpy(), rtol=3e-7, atol=0)


@pytest.mark.parametrize('side', [1, 2, 4, 8, 16])
def test_rope_rotation_matches_reference(side):
  x = np.random.default_rng(side).normal(size=(2, 3, side * side, 64)).astype(np.float32)
  want = ref.Rope(32)(torch.from_numpy(x)).numpy()
  got = apply_rope(jnp.asarray(x), tuple(jnp.asarray(a) for a in scale_rope_table(side, 64)))
  assert rel(got, want) < 2e-6
  if side == 1:
    np.testing.assert_array_equal(np.asarray(got), x)    # position (0, 0): identity


def test_rope_layout_rows_first_interleaved_pairs():
  cos, sin = scale_rope_table(2, 8)     # freqs (1, 1e-2); positions {0, 8}
  f = rope_freqs(8)
  # token 1 = (row 0, col 8): first half (rows) angle 0, second half col * f
  np.testing.assert_allclose(cos[1, :4], 1.0)
  np.testing.assert_allclose(cos[1, 4:], np.cos(8 * np.repeat(f, 2)), rtol=1e-6)
  # token 2 = (row 8, col 0)
  np.testing.assert_allclose(cos[2, :4], np.cos(8 * np.repeat(f, 2)), rtol=1e-6)


def test_timestep_embedding_matches_reference():
  tau = np.array([1000, 650, 0, 35])
  half = 128
  phi = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  args = torch.from_numpy(tau)[:, None].float() * phi[None]
  want = torch.cat([torch.cos(args), torch.sin(args)], -1).numpy()
  got = np.asarray(timestep_embedding(jnp.asarray(tau)))
  # torch's vectorised float32 exp is off by one ulp at 3 of the 128 frequencies; times
  # tau <= 1000 that moves an angle by <= 4e-5 rad (the head parity absorbs it, see
  # test_flowar_parity). cos first, then sin; a swapped order or wrong frequencies fail by ~1.
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
  assert np.abs(got[:, :8] - want[:, :8]).max() < 1e-6


def torch_next(x, side, nxt):
  b, n, c = x.shape
  g = torch.from_numpy(x).permute(0, 2, 1).reshape(b, c, side, side)
  g = F.interpolate(F.interpolate(g, (16, 16), mode='bicubic'), (nxt, nxt), mode='area')
  return g.reshape(b, c, -1).permute(0, 2, 1).numpy()


@pytest.mark.parametrize('side', [1, 2, 4, 8])
def test_next_scale_input_matches_torch(side):
  x = (np.random.default_rng(side).normal(size=(3, side * side, 16)) * 4).astype(np.float32)
  got = np.asarray(next_scale_input(jnp.asarray(x), side))
  want = torch_next(x, side, 2 * side)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())
  # float64 torch agrees to rounding: the matrix is the exact operator
  want64 = torch_next(x.astype(np.float64), side, 2 * side)
  assert rel(got, want64) < 1e-6
  # jax.image.resize needs 'cubic-pytorch' with antialias=False to be the same operator
  g = jnp.asarray(x).reshape(3, side, side, 16)
  up = jax.image.resize(g, (3, 16, 16, 16), method='cubic-pytorch', antialias=False)
  k = 16 // (2 * side)
  down = up.reshape(3, 2 * side, k, 2 * side, k, 16).mean((2, 4)).reshape(3, -1, 16)
  assert rel(down, want64) < 1e-6


def test_next_scale_matrices_golden():
  np.testing.assert_array_equal(next_scale_matrix(1), [[1.0], [1.0]])
  np.testing.assert_array_equal(next_scale_matrix(2) * 4096,
                                [[4453, -357], [3138, 958], [958, 3138], [-357, 4453]])
  np.testing.assert_array_equal(next_scale_matrix(4)[0] * 1024, [1117, -93, 0, 0])
  np.testing.assert_array_equal(next_scale_matrix(8)[3, :4] * 256, [-27, 225, 67, -9])
  np.testing.assert_array_equal(next_scale_matrix(8)[15, 6:] * 256, [-27, 283])
