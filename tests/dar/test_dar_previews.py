"""Streaming previews (one decoder step per completed group, during generation) equal the
official post-hoc `decode_code(ids, clip_steps=g+1)` with the same noise; layout prefixes from
an encoded reference image."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import dar_helpers as h  # noqa: E402

from disa_jax.systems.dar import Sampler, SamplingOptions, layout_prefix  # noqa: E402
from reference import dar as ref  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope='module')
def system():
  t_ref, run, _ = h.tokenizer_pair()
  g_ref, gpt, _ = h.gpt_pair()
  return t_ref, g_ref, run, Sampler(gpt, run, matmul_precision='highest')


def _torch_decode(t_ref, ids, noise_nchw, clip=None):
  with torch.no_grad():
    out = t_ref.decode_code(torch.from_numpy(np.asarray(ids)), torch.from_numpy(noise_nchw),
                            clip_steps=clip)
  return out.numpy().transpose(0, 2, 3, 1)


def test_streaming_previews_equal_official_clip_steps(system):
  t_ref, g_ref, run, sampler = system
  labels = np.array([2, 8])
  u = np.random.default_rng(10).random((2, 16)).astype(np.float32)
  x, xt = h.noise(2, seed=11)
  seen = []
  out = sampler.generate(labels, uniforms=u, noise=x, previews=True,
                         options=SamplingOptions(cfg='1.5,3.0'),
                         on_group=lambda g, ids, p: seen.append((g, ids.shape[1])))
  assert seen == [(0, 4), (1, 8), (2, 12), (3, 16)]
  want_ids = ref.generate(g_ref, torch.from_numpy(labels), torch.from_numpy(u), cfg='1.5,3.0')
  np.testing.assert_array_equal(out.ids, want_ids.numpy())
  assert out.previews.shape == (4, 2, 64, 64, 3)
  for g in range(4):
    want = _torch_decode(t_ref, out.ids, xt, clip=g + 1)
    assert h.max_rel_error(out.previews[g], want) <= TOL, g
    # preview g never needed later ids: the official decode of other later ids agrees
    other = out.ids.copy()
    other[:, 4 * (g + 1):] = (other[:, 4 * (g + 1):] + 7) % 64
    if g < 3:
      assert h.max_rel_error(out.previews[g], _torch_decode(t_ref, other, xt, g + 1)) <= TOL
  np.testing.assert_array_equal(out.images, out.previews[-1])
  assert h.max_rel_error(out.images, _torch_decode(t_ref, out.ids, xt)) <= TOL
  assert np.abs(out.previews[0] - out.previews[-1]).max() > 0.1    # previews do change
  assert sampler.tokenizer.compiles['step'] == 1


def test_layout_prefix_from_reference_image(system):
  t_ref, g_ref, run, sampler = system
  img, img_t = h.images(1, seed=12)
  prefix = layout_prefix(run, img[0], groups=2)
  with torch.no_grad():
    want = t_ref.encode(torch.from_numpy(img_t)).numpy()[0, :8]
  np.testing.assert_array_equal(prefix, want)
  labels = np.array([1, 4, 9])
  u = np.random.default_rng(13).random((3, 16)).astype(np.float32)
  x, _ = h.noise(3, seed=14)
  out = sampler.generate(labels, uniforms=u, prefix_ids=prefix, noise=x)
  np.testing.assert_array_equal(out.ids[:, :8], np.broadcast_to(prefix, (3, 8)))
  ref_ids = ref.generate(g_ref, torch.from_numpy(labels), torch.from_numpy(u),
                         prefix=torch.from_numpy(np.stack([prefix] * 3))).numpy()
  np.testing.assert_array_equal(out.ids, ref_ids)
  assert out.images.shape == (3, 64, 64, 3)
  # sharing one sample's prefix across a batch (--prefix-from-sample)
  shared = sampler.generate(labels, uniforms=u, prefix_ids=out.ids[0, :4], decode=False).ids
  np.testing.assert_array_equal(shared[:, :4], np.broadcast_to(out.ids[0, :4], (3, 4)))
