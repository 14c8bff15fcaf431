"""FID Inception-v3: converter (strict, atomic), TF1 resize, parity with the PyTorch reference."""

import numpy as np
import pytest
from helpers import max_rel_error


@pytest.fixture(scope='module')
def torch_ref(random_inception):
  model = random_inception[0]
  assert any(k.endswith('num_batches_tracked') for k in model.state_dict())  # dropped on convert
  return random_inception


def test_parity_with_torch_reference(torch_ref):
  import torch

  from disa_jax.eval.inception import InceptionExtractor, load_inception

  model, _, converted = torch_ref
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  images[1, :16] = 255                                       # saturated region
  ref = model.features(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  extractor = InceptionExtractor(load_inception(converted), batch_size=2)
  got = extractor(images)
  for k, dim in (('pool', 2048), ('logits_unbiased', 1008), ('spatial', 2023)):
    assert got[k].shape == (2, dim) and got[k].dtype == np.float32
    err = max_rel_error(got[k], ref[k].numpy())
    print(f'{k}: max relative error {err:.2e}')
    assert err < 2e-5, (k, err)
  # a batch size that does not divide the input pads and drops, without changing results
  three = np.concatenate([images, images[:1]])
  again = extractor(three)
  np.testing.assert_allclose(again['pool'][:2], got['pool'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(again['pool'][2], got['pool'][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('size_in', [8, 33, 256, 299, 320])
def test_tf1_resize_matches_reference(size_in):
  torch = pytest.importorskip('torch')
  from disa_jax.eval.inception import resize_bilinear_tf1
  from reference.inception import resize_tf1

  x = np.random.default_rng(size_in).integers(0, 256, (1, size_in, size_in, 3)).astype(np.float32)
  got = np.asarray(resize_bilinear_tf1(x))
  ref = resize_tf1(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert got.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)     # uint8 scale
  if size_in == 299:
    np.testing.assert_array_equal(got, x)                      # identity at 299
  # TF1 semantics: output pixel 0 is input pixel 0 and the grid is not half-pixel centred
  np.testing.assert_array_equal(got[0, 0, 0], x[0, 0, 0])


def _bad_checkpoint(tmp_path, edit):
  import torch

  sd = torch.load(tmp_path / 'pt_inception.pth', weights_only=True)
  edit(sd)
  path = tmp_path / 'bad.pth'
  torch.save(sd, path)
  return path


@pytest.mark.parametrize('edit,message', [
  (lambda sd: sd.pop('Mixed_6d.branch1x1.bn.running_var'), '1 missing keys'),
  (lambda sd: sd.update({'AuxLogits.fc.weight': sd['fc.weight']}), 'unexpected keys'),
  (lambda sd: sd.update({'fc.weight': sd['fc.weight'][:1000]}), 'shape mismatches: fc.weight'),
])
def test_converter_rejects_mismatched_checkpoints(torch_ref, tmp_path, edit, message):
  from disa_jax.convert.inception import convert
  from disa_jax.convert.mapping import ConversionError

  src = torch_ref[1]
  (tmp_path / 'pt_inception.pth').symlink_to(src)
  bad = _bad_checkpoint(tmp_path, edit)
  with pytest.raises(ConversionError, match=message):
    convert(bad, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out')]


def test_convert_cli_errors_are_one_line(torch_ref, tmp_path, capsys):
  import torch

  from disa_jax.convert.cli import main

  torch.save({'encoder_norm.weight': torch.ones(4)}, tmp_path / 'mar.pth')
  assert main(['inception', '--torch-checkpoint', str(tmp_path / 'mar.pth'),
               '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'does not look like the FID Inception' in err
  assert main(['inception', '--torch-checkpoint', str(tmp_path / 'none.pth'),
               '--out', str(tmp_path / 'o')]) == 2
  assert 'does not exist' in capsys.readouterr().err
  assert main(['inception', '--torch-checkpoint', str(torch_ref[1]),
               '--out', str(torch_ref[2])]) == 2                # exists, no --overwrite
  assert 'already exists' in capsys.readouterr().err
  assert not (tmp_path / 'o').exists()


def test_loader_rejects_other_model_kinds(tmp_path):
  from flax import nnx

  from disa_jax.checkpoint import CheckpointError, save_model
  from disa_jax.eval.inception import check_images, load_inception

  save_model(tmp_path / 'lin', nnx.Linear(2, 2, rngs=nnx.Rngs(0)), kind='mar', model_config={})
  with pytest.raises(CheckpointError, match="holds a 'mar' model, not the FID Inception"):
    load_inception(tmp_path / 'lin')
  with pytest.raises(CheckpointError, match='does not exist'):
    load_inception(tmp_path / 'missing')
  with pytest.raises(ValueError, match='must be uint8'):
    check_images(np.zeros((1, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r'RGB \[N, H, W, 3\]'):
    check_images(np.zeros((1, 8, 8), np.uint8))
