"""Data pipeline: caching stage -> ArrayRecord -> grain (digits and the ImageNet path)."""

import numpy as np
import pytest
from PIL import Image

from disa_jax.data import cache, digits, imagenet, pipeline, records


@pytest.fixture(scope='module')
def digits_cache(tmp_path_factory):
  return digits.build_cache(tmp_path_factory.mktemp('cache') / 'digits')


def test_digits_splits_are_fixed_disjoint_and_stratified():
  idx = digits.split_indices()
  assert len(idx['heldout']) == 300 and len(idx['train']) == 1797 - 300
  assert not set(idx['train']) & set(idx['heldout'])
  x, y = digits.load_split('heldout')
  assert x.shape == (300, 16, 16, 1) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0 and np.bincount(y).tolist() == [30] * 10


def test_digits_cache_records(digits_cache):
  meta = records.read_meta(digits_cache)
  assert meta['splits'] == {'train': 1497, 'heldout': 300} and meta['shape'] == [16, 16, 1]
  assert meta['latent_scale'] == digits.TOKEN_SCALE and meta['tokenizer'] == 'pixels'
  src = records.data_source(digits_cache, 'heldout')
  x, y = digits.load_split('heldout')
  for i in (0, 123, 299):
    rec = records.decode_record(src[i])
    np.testing.assert_array_equal(rec['mean'], x[i])
    np.testing.assert_array_equal(rec['mean_flip'], x[i][:, ::-1])
    assert rec['label'] == y[i] and (rec['logvar'] == digits.PIXEL_LOGVAR).all()
  with pytest.raises(records.CacheError, match='has no split'):
    records.shard_paths(digits_cache, 'validation')


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_grain_batches_shapes_and_determinism(digits_cache):
  ds = pipeline.make_dataset(digits_cache, 'train', global_batch=32, seed=7, flip_prob=0.0,
                             process_index=0, process_count=1)
  a = _take(pipeline.make_iterator(ds), 50)  # > 1 epoch (1497 / 32 = 46 batches)
  b = _take(pipeline.make_iterator(ds), 50)
  assert a[0]['mean'].shape == (32, 16, 16, 1) and a[0]['label'].shape == (32,)
  assert a[0]['mean'].dtype == np.float32
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['mean'], y['mean'])
  other = _take(pipeline.make_iterator(pipeline.make_dataset(
    digits_cache, 'train', global_batch=32, seed=8, flip_prob=0.0, process_index=0,
    process_count=1)), 1)
  assert not np.array_equal(other[0]['label'], a[0]['label'])
  # Every record once per epoch, a new order in the next epoch.
  first = np.concatenate([x['mean'].reshape(32, -1) for x in a[:46]])
  assert len({r.tobytes() for r in first}) == 46 * 32
  assert not np.array_equal(a[46]['label'], a[0]['label'])


def test_grain_per_process_shards_are_disjoint(digits_cache):
  seen = []
  for p in range(2):
    ds = pipeline.make_dataset(digits_cache, 'heldout', global_batch=20, seed=0,
                               flip_prob=0.0, process_index=p, process_count=2)
    batches = _take(pipeline.make_iterator(ds), 15)  # 150 records per process = 1 epoch
    assert batches[0]['mean'].shape == (10, 16, 16, 1)
    seen.append({r.tobytes() for b in batches for r in b['mean'].reshape(10, -1)})
  assert len(seen[0]) == len(seen[1]) == 150 and not seen[0] & seen[1]
  with pytest.raises(ValueError, match='not divisible by 2 processes'):
    pipeline.make_dataset(digits_cache, 'heldout', global_batch=7, seed=0, process_index=0,
                          process_count=2)


def test_grain_iterator_checkpoint_restore(digits_cache):
  ds = pipeline.make_dataset(digits_cache, 'train', global_batch=16, seed=3, flip_prob=0.5,
                             process_index=0, process_count=1)
  it = pipeline.make_iterator(ds)
  _take(it, 5)
  state = it.get_state()
  want = _take(it, 4)
  fresh = pipeline.make_iterator(ds)
  fresh.set_state(state)
  got = _take(fresh, 4)
  for x, y in zip(want, got, strict=True):
    np.testing.assert_array_equal(x['mean'], y['mean'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_flip_probability_picks_the_cached_flip(digits_cache):
  def first(flip):
    ds = pipeline.make_dataset(digits_cache, 'heldout', global_batch=10, seed=1,
                               flip_prob=flip, process_index=0, process_count=1, shuffle=False)
    return next(pipeline.make_iterator(ds))['mean']

  x, _ = digits.load_split('heldout')
  np.testing.assert_array_equal(first(0.0), x[:10])
  np.testing.assert_array_equal(first(1.0), x[:10, :, ::-1])


def test_center_crop_matches_adm():
  rng = np.random.default_rng(0)
  big = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
  out = imagenet.center_crop_arr(Image.fromarray(big), 256)
  pooled = big.reshape(256, 2, 256, 2, 3).astype(np.float64).mean(axis=(1, 3))
  assert out.shape == (256, 256, 3)
  assert np.abs(out.astype(np.float64) - pooled).max() <= 1.0  # BOX halving, then identity
  wide = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
  out = imagenet.center_crop_arr(Image.fromarray(wide), 256)
  resized = np.array(Image.fromarray(wide).resize((597, 256), Image.BICUBIC))  # round(700*256/300)
  np.testing.assert_array_equal(out, resized[:, 170:426])
  small = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)  # upsampled to short side 256
  assert imagenet.center_crop_arr(Image.fromarray(small), 256).shape == (256, 256, 3)


def _fake_encoder(images):
  """Deterministic stand-in for the KL-16 VAE: 16x16 block means of the 3 channels, plus
  a channel derived from them, as (mean, logvar) [B, 16, 16, 4]."""
  b = images.shape[0]
  pooled = images.reshape(b, 16, 16, 16, 16, 3).mean(axis=(2, 4))
  mean = np.concatenate([pooled, pooled[..., :1] * pooled[..., 1:2]], axis=-1)
  return mean, np.tanh(mean) - 3.0


def test_imagenet_cache_stage_with_injected_encoder(tmp_path):
  rng = np.random.default_rng(1)
  examples = [{'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': i % 3}
              for i, (h, w) in enumerate([(300, 400), (256, 256), (600, 520), (280, 500),
                                          (512, 300)])]
  out = cache.cache_moments(tmp_path / 'in', {'train': examples[:4], 'validation': examples[4:]},
                            _fake_encoder, preprocess=imagenet.preprocess, batch_size=3,
                            records_per_shard=2, meta={'dataset': 'fake', 'latent_scale': 0.2325})
  meta = records.read_meta(out)
  assert meta['splits'] == {'train': 4, 'validation': 1} and meta['shape'] == [16, 16, 4]
  assert len(records.shard_paths(out, 'train')) == 2
  src = records.data_source(out, 'train')
  for i in range(4):
    rec = records.decode_record(src[i])
    x, label = imagenet.preprocess(examples[i])
    m, lv = _fake_encoder(x[None])
    mf, lvf = _fake_encoder(x[None, :, ::-1])
    np.testing.assert_allclose(rec['mean'], m[0], rtol=1e-6)
    np.testing.assert_allclose(rec['logvar_flip'], lvf[0], rtol=1e-6)
    np.testing.assert_allclose(rec['mean_flip'], mf[0], rtol=1e-6)
    assert rec['label'] == label
  with pytest.raises(records.CacheError, match='already exists'):
    cache.cache_moments(out, {'train': examples}, _fake_encoder, preprocess=imagenet.preprocess)
  with pytest.raises(records.CacheError, match='expected two'):
    cache.cache_moments(tmp_path / 'bad', {'train': examples[:1]},
                        lambda x: (x[..., 0], x[..., 0]), preprocess=imagenet.preprocess)


def test_folder_source_labels_are_sorted_class_dirs(tmp_path):
  for wnid, n in (('n02', 2), ('n01', 1)):
    (tmp_path / wnid).mkdir()
    for i in range(n):
      Image.fromarray(np.full((20, 30, 3), i * 50, np.uint8)).save(tmp_path / wnid / f'{i}.JPEG')
  src = imagenet.FolderSource(tmp_path)
  assert src.classes == ['n01', 'n02'] and len(src) == 3
  assert [src[i]['label'] for i in range(3)] == [0, 1, 1]
  assert src[0]['image'].shape == (20, 30, 3)


def test_cache_cli_errors(tmp_path):
  """disa-cache (absl, the shared error path): one `error:` line, exit 2, nothing written."""
  import subprocess
  import sys

  def cache_cli(*args):
    r = subprocess.run([sys.executable, '-m', 'disa_jax.cli.cache', *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith('error: '), r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    return r.stderr

  err = cache_cli('--source=folder', f'--out={tmp_path / "c"}', f'--vae={tmp_path}')
  assert 'error: --source=folder needs --folder=ROOT' in err
  err = cache_cli('--source=folder', f'--folder={tmp_path}', '--splits=train',
                  f'--out={tmp_path / "c"}', f'--vae={tmp_path}')
  assert 'image folder' in err
  assert not (tmp_path / 'c').exists()
