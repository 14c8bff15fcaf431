"""Test helpers shared by the FlowAR and xAR tests (`flowar/flowar_testlib.py`,
`xar/xar_testlib.py`): reference models with large random weights, their numpy state dicts and
.pth files, conversion through the real converter."""

from __future__ import annotations

import numpy as np
import torch
from helpers import max_rel_error  # noqa: F401  (re-exported for the system testlibs)


def randomize_reference(model, *, seed: int, scale: float, norm_suffixes: tuple[str, ...]):
  """Overwrites `model`'s parameters: norm weights (names ending in `norm_suffixes`)
  1 + N(0, scale), other matrices (except class embeddings) N(0, scale) * 4 / sqrt(fan_in),
  the rest N(0, scale); large enough that GELU / eps / order mistakes change outputs by a wide
  margin. Returns `model`."""
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      if name.endswith(norm_suffixes):
        p.copy_(1.0 + noise)
      elif p.ndim == 2 and name.endswith('weight') and 'class_emb' not in name:
        p.copy_(noise * (1.0 / np.sqrt(p.shape[1])) * 4.0)
      else:
        p.copy_(noise)
  return model


def state_dict_np(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def saved_pth(model, path) -> str:
  torch.save(model.state_dict(), path)
  return str(path)


def converted_model(tmodel, convert_state, read_state_dict, pth_path=None):
  """The nnx model `convert_state` makes of `tmodel` (through a .pth file at `pth_path`, read
  back with `read_state_dict`, when given)."""
  from flax import nnx
  sd = state_dict_np(tmodel) if pth_path is None else read_state_dict(saved_pth(tmodel, pth_path))
  _, graphdef, state = convert_state(sd)
  return nnx.merge(graphdef, state)


def check_bad_checkpoint(bad: dict, words: str, *, convert_state, convert, error, tmp_path):
  """A broken state dict `bad` fails conversion with one line of type `error` (a UserError)
  containing `words`, both in memory and from a .pth file, and the file path writes nothing."""
  from disa_jax.errors import UserError

  try:
    convert_state(bad)
  except error as e:
    msg = str(e)
    assert '\n' not in msg and words in msg, msg
    assert isinstance(e, UserError)
  else:
    raise AssertionError(f'no {error.__name__} for a checkpoint lacking {words!r}')
  path = tmp_path / 'bad.pth'
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bad.items()}, path)
  try:
    convert(path, tmp_path / 'out')
  except error:
    pass
  else:
    raise AssertionError(f'no {error.__name__} converting {path}')
  assert not (tmp_path / 'out').exists()
  assert [p.name for p in tmp_path.iterdir()] == ['bad.pth']


def train_a_few_steps(model, *, init_state, train_step, b2: float, steps: int = 12):
  """(final train state, metrics per step) of `steps` AdamW steps (blr 1e-3, constant) on one
  fixed batch of 4 random 16x16x16 latents; asserts every step is finite."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx

  from disa_jax.train.optim import make_optimizer

  tc = ml_collections.ConfigDict(dict(blr=1e-3, lr=0.0, warmup_steps=0, num_steps=20,
                                      lr_schedule='constant', min_lr=0.0, weight_decay=0.02,
                                      b1=0.9, b2=b2, grad_clip=3.0))
  tx = make_optimizer(tc, 256)
  graphdef, _ = nnx.split(model)
  state = init_state(model, tx, seed=0)
  rng = np.random.default_rng(1)
  mean = jnp.asarray(rng.standard_normal((4, 16, 16, 16)).astype(np.float32) * 4)
  batch = {'mean': mean, 'logvar': jnp.full_like(mean, -30.0), 'label': jnp.arange(4)}
  step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, ema_rate=0.9))
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    assert float(m['finite']) == 1.0
    metrics.append(m)
  return state, metrics


def listed_shapes(path, section: str) -> dict[str, tuple[int, ...]]:
  """{key: torch shape} of one section ('## <section> ...') of a key listing whose lines are
  'key<TAB>(shape)<TAB>dtype' (tests/data/{flowar,xar}_state_dict_keys.txt)."""
  keys, on = {}, False
  for line in path.read_text().splitlines():
    if line.startswith('## '):
      on = line.startswith(f'## {section} ')
      continue
    if on and '\t' in line:
      k, shape, _ = line.split('\t')
      keys[k] = tuple(int(x) for x in shape.strip('()').split(',') if x.strip())
  return keys


def check_pixel_images(out, n: int, scale: float = 1.4) -> None:
  """disa-sample's output of a digits config (written with --save-tokens): images/NNNNNN.png are
  the 16x16 pixel tokens decoded as to_uint8(tokens / scale)."""
  from PIL import Image

  from disa_jax.tokenizers.image import to_uint8

  tokens = np.load(out / 'tokens.npy')
  assert tokens.shape == (n, 256, 1)
  for i in range(n):
    img = np.asarray(Image.open(out / 'images' / f'{i:06d}.png').convert('L'))
    np.testing.assert_array_equal(img, to_uint8(tokens[i, :, 0].reshape(16, 16) / scale))
