"""disa-convert mar / vae: official checkpoint formats, strict validation and clear errors,
parity with the PyTorch reference through the real converter, full-size key lists, and
disa-sample end to end on converted weights.

Reference checkpoints are written exactly as the official code does:
`torch.save({'model': sd, 'model_ema': sd_ema, ...}, 'checkpoint-last.pth')`,
`torch.save({'model': vae_sd}, 'kl16.ckpt')` and single-state-dict `.safetensors` files.
Parity is max |jax - torch| / max |torch| in fp32 with matmul precision 'highest'.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from helpers import (
  PARITY_WEIGHT_SCALE,
  SMALL_VAE,
  TOKEN_PARITY_CASES,
  TOKEN_PARITY_TOL,
  max_rel_error,
  official_keys,
  token_parity,
  torch_vae,
)

from disa_jax.checkpoint import load_mar
from disa_jax.config import TINY_MODEL
from disa_jax.convert import vae as convert_vae
from disa_jax.convert.cli import main as convert_main
from disa_jax.convert.mapping import ConversionError
from disa_jax.systems.mar import convert as convert_mar
from disa_jax.systems.mar.model import MARConfig
from disa_jax.tokenizers.kl16 import VAEConfig

PARITY_TOL = 1e-5
TINY_HEADS = str(TINY_MODEL['encoder_num_heads'])


def _params(model) -> dict:
  return {'.'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny MAR training checkpoint (model != model_ema, plus the optimizer/epoch/args
  entries of main_mar.py), its EMA state dict as .safetensors, and a small kl16.ckpt."""
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file

  from reference import mar as tr

  d = tmp_path_factory.mktemp('official')
  cfg = MARConfig.from_dict(TINY_MODEL)
  ema = tr.randomize_(tr.TorchMAR(cfg).eval(), seed=4, scale=PARITY_WEIGHT_SCALE)
  raw = tr.randomize_(tr.TorchMAR(cfg).eval(), seed=5, scale=PARITY_WEIGHT_SCALE)
  torch.save({'model': raw.state_dict(), 'model_ema': ema.state_dict(),
              'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4, 'params': [0, 1]}]},
              'epoch': 799, 'args': argparse.Namespace(model='mar_tiny', diffloss_d=2)},
             d / 'checkpoint-last.pth')
  save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, d / 'mar-tiny.safetensors')
  torch.save({'model': torch_vae(VAEConfig(**SMALL_VAE), seed=1).state_dict()}, d / 'kl16.ckpt')
  return {'dir': d, 'ema': ema, 'raw': raw}


@pytest.fixture(scope='module')
def converted(files):
  """The EMA weights converted with the disa-convert command line (in process)."""
  d = files['dir']
  assert convert_main(['mar', '--torch-checkpoint', str(d / 'checkpoint-last.pth'),
                       '--out', str(d / 'mar'), '--num-heads', TINY_HEADS]) == 0
  assert convert_main(['vae', '--torch-checkpoint', str(d / 'kl16.ckpt'),
                       '--out', str(d / 'kl16')]) == 0
  return {'mar': d / 'mar', 'vae': d / 'kl16'}


def test_mar_decoder_and_head_parity_through_converter(files, converted):
  torch = pytest.importorskip('torch')
  tm, model = files['ema'], load_mar(converted['mar'])
  meta = json.loads((converted['mar'] / 'meta.json').read_text())
  assert meta['kind'] == 'mar' and meta['source_entry'] == 'model_ema' and meta['weights'] == 'ema'
  cfg = model.config
  assert (cfg.encoder_num_heads, cfg.class_num, cfg.buffer_size, cfg.seq_len) == (4, 10, 8, 16)
  rng = np.random.default_rng(0)
  b, seq = 3, cfg.seq_len
  tokens = rng.standard_normal((b, seq, 16)).astype(np.float32)
  mask = np.zeros((b, seq), np.float32)
  for row in mask:
    row[rng.permutation(seq)[:10]] = 1.0                     # 10 unknown tokens per row
  labels = np.array([1, 7, -1])                              # -1: the unconditional fake_latent
  with jax.default_matmul_precision('highest'):
    ce = model.class_embedding(labels)
    z = np.asarray(model.forward_mae_decoder(
      model.forward_mae_encoder(jnp.asarray(tokens), jnp.asarray(mask), ce), jnp.asarray(mask)))
    x = rng.standard_normal((6, 16)).astype(np.float32)
    t = np.array([0, 10, 250, 500, 950, 999], np.float32)
    c = np.array(z.reshape(-1, z.shape[-1])[:6])
    head = np.asarray(model.diffloss.net(jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)))
  with torch.no_grad():
    t_ce = torch.cat([tm.class_emb(torch.tensor([1, 7])), tm.fake_latent])
    t_z = tm.forward_mae_decoder(tm.forward_mae_encoder(
      torch.from_numpy(tokens), torch.from_numpy(mask), t_ce), torch.from_numpy(mask)).numpy()
    t_head = tm.diffloss.net(torch.from_numpy(x), torch.from_numpy(t),
                             torch.from_numpy(c)).numpy()
  rel_z, rel_head = max_rel_error(z, t_z), max_rel_error(head, t_head)
  print(f'MAR decoder z max rel error {rel_z:.2e}, head output {rel_head:.2e}')
  assert rel_z < PARITY_TOL, f'decoder output z max relative error {rel_z:.2e}'
  assert rel_head < PARITY_TOL, f'head output max relative error {rel_head:.2e}'


@pytest.mark.parametrize('case', TOKEN_PARITY_CASES[:2], ids=['disa_clamp950', 'mar'])
def test_token_parity_through_converter(files, converted, case):
  preset, k, cfg, schedule, temp = case
  rel = token_parity(load_mar(converted['mar']), files['ema'], preset=preset, k=k, cfg=cfg,
                     schedule=schedule, temp=temp)
  print(f'token parity ({preset}) through the converter: max rel error {rel:.2e}')
  assert rel < TOKEN_PARITY_TOL, f'sampled tokens max relative error {rel:.2e}'


def test_raw_weights_and_safetensors(files, converted, tmp_path):
  d = files['dir']
  raw_dir = convert_mar.convert(d / 'checkpoint-last.pth', tmp_path / 'raw', weights='raw',
                                variant=None, overwrite=False, num_heads=4)
  meta = json.loads((raw_dir / 'meta.json').read_text())
  assert meta['source_entry'] == 'model' and meta['weights'] == 'raw'
  raw = _params(load_mar(raw_dir))
  np.testing.assert_array_equal(raw['fake_latent'],
                                files['raw'].fake_latent.detach().numpy())
  np.testing.assert_array_equal(raw['z_proj.kernel'],
                                files['raw'].z_proj.weight.detach().numpy().T)
  ema = _params(load_mar(converted['mar']))
  st = _params(load_mar(convert_mar.convert(d / 'mar-tiny.safetensors', tmp_path / 'st',
                                            weights='ema', variant=None, overwrite=False,
                                            num_heads=4)))
  assert json.loads((tmp_path / 'st' / 'meta.json').read_text())['weights'] == 'file'
  assert st.keys() == ema.keys() and len(st) == len(raw)
  for k in st:
    np.testing.assert_array_equal(st[k], ema[k])
  assert np.abs(raw['fake_latent'] - ema['fake_latent']).max() > 0.01


def test_safetensors_convert_without_torch(files, converted, tmp_path):
  """A .safetensors file converts in a process where `import torch` fails."""
  d = files['dir']
  code = ('import sys; sys.modules["torch"] = None\n'
          'from disa_jax.convert.cli import main\n'
          f'sys.exit(main(["mar", "--torch-checkpoint", "{d / "mar-tiny.safetensors"}", '
          f'"--out", "{tmp_path / "m"}", "--num-heads", "{TINY_HEADS}"]))')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                     cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr
  got, want = _params(load_mar(tmp_path / 'm')), _params(load_mar(converted['mar']))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.fixture(scope='module')
def bad_files(files):
  """Files that must be refused, next to the good ones."""
  import pathlib
  import pickle

  import torch

  d = files['dir']
  (d / 'random.pth').write_bytes(bytes(range(7, 256)) * 8)
  (d / 'garbage.pth').write_bytes(b'\x80\x02' + bytes(range(200, 0, -1)) * 8)
  (d / 'notes.txt').write_text('these are not weights\n')
  (d / 'fake.safetensors').write_text('not a safetensors file')
  with open(d / 'unsafe.pth', 'wb') as f:          # a pickle that would construct a class
    pickle.dump({'model': pathlib.PurePosixPath('x')}, f, protocol=2)
  sd = files['ema'].state_dict()
  torch.save({'model': sd}, d / 'raw_only.pth')
  bad = dict(sd)
  del bad['mask_token']
  bad['z_proj.bias'] = torch.zeros(5)
  bad['encoder_blocks.0.attn.extra'] = torch.zeros(2)
  torch.save({'model_ema': bad}, d / 'mismatch.pth')
  torch.save({'model_ema': {'layer.weight': torch.zeros(3, 3)}}, d / 'other.pth')
  return d


@pytest.mark.parametrize('args,message', [
  (['mar', 'missing.pth'], 'missing.pth does not exist'),
  (['mar', 'random.pth'], 'random.pth is not a PyTorch checkpoint'),
  (['mar', 'garbage.pth'], 'garbage.pth is not a PyTorch checkpoint'),
  (['vae', 'notes.txt'], 'notes.txt is not a PyTorch checkpoint'),
  (['mar', 'fake.safetensors'], 'fake.safetensors is not a valid safetensors file'),
  (['mar', 'unsafe.pth'], 'contains objects other than tensors; refusing to unpickle it'),
  (['mar', 'kl16.ckpt'], 'holds a KL-16 VAE, not a MAR model; convert it with `disa-convert '
                         'vae'),
  (['vae', 'checkpoint-last.pth'], 'holds a MAR model, not a KL-16 VAE; convert it with '
                                   '`disa-convert mar'),
  (['mar', 'raw_only.pth'], "has no 'model_ema' entry (it holds 'model'); pass --weights raw"),
  (['mar', 'mismatch.pth', '--num-heads', '4'], 'checkpoint does not match the mar_custom '
                                                'model:'),
  (['mar', 'other.pth'], 'is not a MAR model checkpoint: none of its 1 keys looks like one'),
  (['mar', 'checkpoint-last.pth'], 'cannot infer the number of attention heads for width '
                                   '64/64'),
  (['mar', 'checkpoint-last.pth', '--variant', 'base'], 'checkpoint is not mar_base: '
                                                        'encoder_embed_dim 64 (expected 768)'),
  (['vae', 'kl16.ckpt', '--variant', 'base'], '--variant applies to `disa-convert mar` only'),
  (['vae', 'kl16.ckpt', '--num-heads', '8'], '--num-heads applies to `disa-convert mar` only'),
])
def test_errors_are_one_line_and_write_nothing(bad_files, capsys, args, message):
  d = bad_files
  kind, name, *rest = args
  out = d / 'out'
  rc = convert_main([kind, '--torch-checkpoint', str(d / name), '--out', str(out), *rest])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert err.startswith('error: ') and message in err.splitlines()[0], err
  assert 'Traceback' not in err
  assert not out.exists()
  assert not [p for p in d.iterdir() if p.name.startswith('.out')]     # no temp leftovers
  if name == 'mismatch.pth':                                          # the full listing
    assert '2 missing keys: mask_token, z_proj.bias' not in err
    assert '1 missing keys: mask_token' in err
    assert '1 unexpected keys: encoder_blocks.0.attn.extra' in err
    assert 'z_proj.bias: checkpoint (5,), model expects (64,)' in err


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
  d = files['dir']
  out = tmp_path / 'mar'
  args = ['mar', '--torch-checkpoint', str(d / 'checkpoint-last.pth'), '--out', str(out),
          '--num-heads', TINY_HEADS]
  assert convert_main(args) == 0
  before = (out / 'meta.json').stat().st_mtime_ns
  assert convert_main([*args, '--weights', 'raw']) == 2
  assert 'already exists; choose another --out or pass --overwrite' in capsys.readouterr().err
  assert (out / 'meta.json').stat().st_mtime_ns == before
  assert convert_main([*args, '--weights', 'raw', '--overwrite']) == 0
  assert json.loads((out / 'meta.json').read_text())['weights'] == 'raw'
  (tmp_path / 'not_a_model').mkdir()
  assert convert_main([*args[:4], str(tmp_path / 'not_a_model'), '--overwrite']) == 2
  assert 'it is not a disa_jax model directory' in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['mar', 'not_a_model']   # no temp copies


def test_official_key_lists_convert(data_dir):
  """Exactly the official key sets and shapes pass the strict check, with the architecture
  inferred from the shapes (mar_base: 12 heads, head 6 x 1024; KL-16: the default config)."""
  base = official_keys(data_dir, 'mar_base')
  assert len(base) == 364
  cfg, name = convert_mar.check(base)
  assert name == 'mar_base'
  assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads) == (768, 12, 12)
  assert (cfg.diffloss_d, cfg.diffloss_w, cfg.buffer_size, cfg.class_num) == (6, 1024, 64, 1000)
  assert cfg.to_dict() == MARConfig().to_dict()           # what configs/mar_base.py expects
  for variant, heads, head in (('mar_large', 16, (8, 1280)), ('mar_huge', 16, (12, 1536))):
    cfg, name = convert_mar.infer_config(official_keys(data_dir, variant))
    assert name == variant and cfg.encoder_num_heads == heads
    assert (cfg.diffloss_d, cfg.diffloss_w) == head
  vae = official_keys(data_dir, 'KL-16')
  assert len(vae) == 312
  assert convert_vae.check(vae) == VAEConfig()
  # One key fewer / one shape off is caught by the same strict check.
  broken = dict(base)
  del broken['decoder_blocks.3.mlp.fc2.bias']
  broken['diffloss.net.res_blocks.0.mlp.0.weight'] = (1024, 1000)
  with pytest.raises(ConversionError) as e:
    convert_mar.check(broken)
  assert '1 missing keys: decoder_blocks.3.mlp.fc2.bias' in str(e.value)
  assert 'diffloss.net.res_blocks.0.mlp.0.weight: checkpoint (1024, 1000), model expects ' \
         '(1024, 1024)' in str(e.value)


def test_sample_end_to_end_with_converted_weights(converted, tmp_path):
  """disa-sample with a converted (random-weight, tiny) MAR and KL-16-style VAE writes PNGs."""
  from PIL import Image
  from test_cli import run_cli

  out = tmp_path / 'samples'
  r = run_cli(f'--config={REPO}/configs/mar_base.py:tiny', f'--checkpoint={converted["mar"]}',
              f'--vae={converted["vae"]}', '--num-images=3', '--batch-size=2', '--num-iter=3',
              '--classes=1,2,3', f'--out={out}')
  assert r.returncode == 0, r.stderr
  assert f'checkpoint {converted["mar"]}' in r.stdout
  pngs = sorted(os.listdir(out / 'images'))
  assert pngs == ['000000.png', '000001.png', '000002.png']
  imgs = [np.asarray(Image.open(out / 'images' / p)) for p in pngs]
  assert all(i.shape == (64, 64, 3) and i.dtype == np.uint8 for i in imgs)
  assert all(i.std() > 0 for i in imgs) and np.abs(imgs[0].astype(int) - imgs[1]).max() > 0
  assert (out / 'grid.png').exists() and not (out / 'tokens.npy').exists()
  assert json.loads((out / 'metrics.json').read_text())['num_images'] == 3


@pytest.mark.slow
def test_full_size_mar_base_converts(data_dir, tmp_path):
  """A random-weight state dict with exactly the official mar_base keys/shapes, written as
  mar-base.safetensors, through `disa-convert` and `load_mar` (~1 GB on disk; slow)."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  keys = official_keys(data_dir, 'mar_base')
  sd = {k: rng.standard_normal(s, np.float32) * 0.02 for k, s in keys.items()}
  save_file(sd, tmp_path / 'mar-base.safetensors')
  assert convert_main(['mar', '--torch-checkpoint', str(tmp_path / 'mar-base.safetensors'),
                       '--out', str(tmp_path / 'mar_base')]) == 0
  meta = json.loads((tmp_path / 'mar_base' / 'meta.json').read_text())
  assert meta['variant'] == 'mar_base'
  model = load_mar(tmp_path / 'mar_base', expect_config=MARConfig().to_dict())
  p = _params(model)
  np.testing.assert_array_equal(p['encoder_blocks.11.attn.qkv.kernel'],
                                sd['encoder_blocks.11.attn.qkv.weight'].T)
  np.testing.assert_array_equal(p['diffloss.net.res_blocks.5.adaLN_modulation.1.kernel'],
                                sd['diffloss.net.res_blocks.5.adaLN_modulation.1.weight'].T)
  np.testing.assert_array_equal(p['class_emb.embedding'], sd['class_emb.weight'])
