"""MAR modules: official state-dict structure, shapes, and the equivalences the sampler uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import official_keys, tiny_model

from disa_jax.config import MAR_VARIANTS
from disa_jax.convert.mapping import flax_state_to_torch
from disa_jax.layers.vit import dot_product_attention
from disa_jax.systems.mar.model import MAR, MARConfig, count_params, patchify, unpatchify


@pytest.mark.parametrize('variant,params', [('mar_base', 207_924_768),
                                            ('mar_large', 478_326_304),
                                            ('mar_huge', 942_403_104)])
def test_state_tree_mirrors_official_state_dict(data_dir, variant, params):
  cfg = MARConfig.from_dict(MAR_VARIANTS[variant])
  abstract = nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == params
  official = official_keys(data_dir, variant)
  ours = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    ours['.'.join(map(str, path))] = var
  # Mechanical rename: kernel -> weight (transposed), scale/embedding -> weight.
  fake = {k: np.zeros(v.shape, np.float32) for k, v in ours.items()}
  renamed = {k: v.shape for k, v in flax_state_to_torch_like(fake).items()}
  assert renamed == official


def flax_state_to_torch_like(flat):
  out = {}
  for key, arr in flat.items():
    prefix, _, leaf = key.rpartition('.')
    if leaf == 'kernel':
      out[f'{prefix}.weight'] = arr.T
    elif leaf in ('scale', 'embedding'):
      out[f'{prefix}.weight'] = arr
    else:
      out[key] = arr
  return out


def test_export_mapping_matches_tree(tiny_config):
  model = MAR(tiny_config, rngs=nnx.Rngs(0))
  sd = flax_state_to_torch(nnx.state(model, nnx.Param))
  assert sd['encoder_blocks.0.attn.qkv.weight'].shape == (192, 64)
  assert sd['diffloss.net.res_blocks.1.adaLN_modulation.1.weight'].shape == (384, 128)
  assert 'diffloss.net.final_layer.norm_final.weight' not in sd   # no affine params


def test_patchify_roundtrip():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  t = patchify(x, 2)
  assert t.shape == (2, 16, 12)
  # Official feature order within a token is (channel, i, j).
  np.testing.assert_array_equal(t[0, 0, :4], [x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 1, 0, 0],
                                               x[0, 1, 1, 0]])
  np.testing.assert_array_equal(unpatchify(t, 2, 4, 3), x)


def test_gathered_encoder_equals_dense_api():
  model = tiny_model()
  c = model.config
  b, seq = 3, c.seq_len
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((b, seq, c.token_embed_dim)), jnp.float32)
  orders = np.stack([rng.permutation(seq) for _ in range(b)])
  n_vis = 6
  mask = np.ones((b, seq), np.float32)
  for i in range(b):
    mask[i, orders[i, :n_vis]] = 0
  ce = model.class_embedding(jnp.arange(b))
  z_dense = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, ce), mask)
  assert z_dense.shape == (b, seq, c.decoder_embed_dim)
  # Gather the visible tokens (in a shuffled order, plus 2 padded slots).
  vis = np.concatenate([orders[:, :n_vis], orders[:, :2]], axis=1)
  valid = np.arange(n_vis + 2)[None].repeat(b, 0) < n_vis
  vt = jnp.take_along_axis(tokens, jnp.asarray(vis)[..., None], axis=1)
  x = model.encode(vt, jnp.asarray(vis), ce, valid=jnp.asarray(valid))
  z = model.decode(x, jnp.asarray(vis), valid=jnp.asarray(valid))
  np.testing.assert_allclose(z, z_dense, rtol=2e-5, atol=2e-5)
  # Decoder queries only at some positions equal the full decoder there.
  q = jnp.asarray(orders[:, -3:])
  zq = model.decode(x, jnp.asarray(vis), valid=jnp.asarray(valid), query_positions=q)
  np.testing.assert_allclose(zq, jnp.take_along_axis(z_dense, q[..., None], axis=1), rtol=2e-5,
                             atol=2e-5)


def test_attention_splits_and_key_mask():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32) for _ in range(3))
  ref = jax.nn.dot_product_attention(q, k, v)
  for splits in (1, 2, 3, 4):
    np.testing.assert_allclose(dot_product_attention(q, k, v, splits=splits), ref, rtol=1e-5,
                               atol=1e-6)
  mask = jnp.asarray([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
  masked = dot_product_attention(q, k, v, mask, splits=2)
  keep = [0, 1, 3]
  np.testing.assert_allclose(masked[0], jax.nn.dot_product_attention(
    q[:1], k[:1, keep], v[:1, keep])[0], rtol=1e-5, atol=1e-6)


def test_head_cfg_layout():
  model = tiny_model()
  net = model.diffloss.net
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
  t = jnp.asarray([10, 10, 10, 10])
  c = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
  out = net.forward_with_cfg(x, t, c, 3.0)
  full = net(jnp.concatenate([x[:2], x[:2]]), t, c)
  eps = full[2:, :16] + 3.0 * (full[:2, :16] - full[2:, :16])
  np.testing.assert_allclose(out[:2, :16], eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[2:, :16], eps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 16:], full[:, 16:], rtol=1e-5, atol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match='unknown model config keys'):
    MARConfig.from_dict({'encoder_dim': 3})
  with pytest.raises(ValueError, match='divisible'):
    MARConfig(encoder_embed_dim=65, encoder_num_heads=4)
  with pytest.raises(ValueError, match='dtype'):
    MARConfig(dtype='float16')


def test_class_vectors_label_zero_is_a_class():
  """Class 0 is an ordinary ImageNet class (row 0 of class_emb); only negative labels select
  the unconditional fake_latent (official: `labels=None` -> fake_latent)."""
  model = tiny_model(seed=2)
  table = np.asarray(model.class_emb.embedding[...])
  fake = np.asarray(model.fake_latent[...])[0]
  got = np.asarray(model.class_embedding(jnp.array([0, -1, 3, 0])))
  np.testing.assert_array_equal(got[0], table[0])
  np.testing.assert_array_equal(got[3], table[0])
  np.testing.assert_array_equal(got[1], fake)
  np.testing.assert_array_equal(got[2], table[3])
  assert np.abs(table[0] - fake).max() > 1e-2
