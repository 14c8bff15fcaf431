"""One whole Harmon step (MAR encoder -> Qwen2 -> MAR decoder) vs the PyTorch reference of the
official code (`reference/harmon.py`: HF Qwen2 with DynamicCache prefill + curtail, masked tokens
dropped, F.interpolate pos-embeds), fp32, max relative error <= 1e-5; plus the pos-embed resize
against torch's bilinear interpolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from harmon_helpers import max_rel_error, prompts, tiny_harmon, torch_twin  # noqa: E402

from disa_jax.systems.harmon.model import at_image_size, bilinear_resize_matrix  # noqa: E402


@pytest.fixture(autouse=True)
def _highest():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.mark.parametrize('src,dst', [(16, 32), (4, 8), (8, 4), (5, 7)])
def test_bilinear_matches_torch_interpolate(src, dst):
  x = torch.randn(1, 3, src, src, generator=torch.Generator().manual_seed(100 * src + dst))
  ref = torch.nn.functional.interpolate(x, size=(dst, dst), mode='bilinear').numpy()
  w = bilinear_resize_matrix(src, dst)
  out = np.einsum('ia,jb,ncab->ncij', w, w, x.numpy())
  np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize('visible', [0, 5, 37])
def test_one_step_matches_reference(visible):
  model = tiny_harmon(seed=1)
  ref = torch_twin(model)
  run = at_image_size(model)
  c = model.config
  seq, ch = c.runtime_mar.seq_len, c.mar.token_embed_dim
  rng = np.random.default_rng(visible)
  rows = 4
  ids, valid = prompts(rows, [9, 4, 9, 6], seed=visible)
  tokens = rng.standard_normal((rows, seq, ch)).astype(np.float32)
  mask = np.ones((rows, seq), np.float32)
  for r in range(rows):
    mask[r, rng.permutation(seq)[:visible]] = 0.0
  with torch.no_grad():
    want = ref.step_conditions(torch.as_tensor(tokens), torch.as_tensor(mask), run.grid,
                               torch.as_tensor(ids), torch.as_tensor(valid)).numpy()

  vpad = visible + 11                       # bucket padding after the real tokens
  pos = np.zeros((rows, vpad), np.int32)
  for r in range(rows):
    vis = np.flatnonzero(mask[r] == 0)
    pos[r, :visible] = vis
  vis_valid = np.arange(vpad)[None].repeat(rows, 0) < visible
  tok_vis = np.take_along_axis(tokens, pos[..., None], axis=1)
  cache = run.prefill(jnp.asarray(ids), jnp.asarray(valid))
  got = run.backbone(jnp.asarray(tok_vis), jnp.asarray(pos), jnp.asarray(vis_valid),
                     visible, cache)
  assert got.shape == (rows, seq, c.mar.decoder_embed_dim)
  assert max_rel_error(got, want) <= 1e-5
  # Query rows only (the sampler's layout) give the same numbers.
  q = np.stack([rng.permutation(seq)[:3] for _ in range(rows)]).astype(np.int32)
  got_q = run.backbone(jnp.asarray(tok_vis), jnp.asarray(pos), jnp.asarray(vis_valid),
                       visible, cache, query_pos=jnp.asarray(q))
  assert max_rel_error(got_q, np.take_along_axis(want, q[..., None], axis=1)) <= 1e-5


@pytest.mark.slow   # ~90-100 s on the 2-core machine (fresh-clone durations, 2026-11-30)
def test_bf16_step_close_to_fp32():
  import jax
  from flax import nnx

  from disa_jax.systems.harmon.convert import _cast
  from disa_jax.systems.harmon.model import Harmon

  model = tiny_harmon(seed=6)
  cfg16 = model.config.with_dtype('bfloat16')
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Harmon(cfg16, rngs=nnx.Rngs(0))))
  m16 = nnx.merge(graphdef, nnx.state(_cast(model, 'bfloat16')))
  outs = []
  for m in (model, m16):
    run = at_image_size(m)
    seq, ch = run.mar.config.seq_len, run.mar.config.token_embed_dim
    rng = np.random.default_rng(0)
    ids, valid = prompts(2, [7, 4])
    vis = np.sort(rng.permutation(seq)[:20])[None].repeat(2, 0).astype(np.int32)
    tok = rng.standard_normal((2, 20, ch)).astype(np.float32)
    cache = run.prefill(jnp.asarray(ids), jnp.asarray(valid))
    assert cache.keys.dtype == (jnp.bfloat16 if m is m16 else jnp.float32)
    outs.append(run.backbone(jnp.asarray(tok), jnp.asarray(vis), jnp.ones((2, 20), bool), 20,
                             cache))
  assert jax.numpy.isfinite(outs[1]).all()
  err = max_rel_error(np.asarray(outs[1], np.float32), outs[0])
  assert 1e-4 < err <= 5e-2
