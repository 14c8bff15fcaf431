"""What the training step claims, checked value by value (issue 21, gap 3): the optimizer
against torch's AdamW + clip_grad_norm_, the EMA formula after a real step, and the label
dropout that classifier-free guidance depends on."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from disa_jax.config import digits_config, train_config
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.train import loop, optim
from disa_jax.train.step import mar_loss, train_step


def test_adamw_with_clipping_matches_torch_step_by_step():
  """Clipping by the global norm, both moments with bias correction, decoupled weight decay
  (scaled by lr) on matrices only: not on 1-D params, biases or the diffusion head."""
  torch = pytest.importorskip('torch')
  tc = train_config(lr=3e-2, warmup_steps=0, num_steps=100, grad_clip=3.0, weight_decay=0.2,
                    b1=0.9, b2=0.95)
  rng = np.random.default_rng(0)
  names = {'enc.kernel': (4, 3), 'enc.bias': (3,), 'norm.scale': (3,),
           'diffloss.net.kernel': (3, 2)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in names.items()}
  params = {k: jnp.asarray(v) for k, v in init.items()}
  decay = {k: optim.decays(k, s) for k, s in names.items()}
  assert decay == {'enc.kernel': True, 'enc.bias': False, 'norm.scale': False,
                   'diffloss.net.kernel': False}
  tx = optim.make_optimizer(tc, 256)
  state = tx.init(params)

  tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
  topt = torch.optim.AdamW(
    [{'params': [tp[k] for k in names if decay[k]], 'weight_decay': tc.weight_decay},
     {'params': [tp[k] for k in names if not decay[k]], 'weight_decay': 0.0}],
    lr=tc.lr, betas=(tc.b1, tc.b2), eps=1e-8)
  for step in range(6):
    scale = 10.0 if step % 2 == 0 else 0.05       # clipped steps and unclipped steps
    grads = {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in names.items()}
    norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert (norm > tc.grad_clip) == (scale == 10.0)
    upd, state = tx.update({k: jnp.asarray(g) for k, g in grads.items()}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)
    for k in names:
      tp[k].grad = torch.tensor(grads[k])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), tc.grad_clip)
    topt.step()
    for k in names:
      np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=2e-5,
                                 atol=1e-6, err_msg=f'{k} after step {step + 1}')


def _tiny_state(ema_rate):
  c = digits_config(tiny=True)
  c.train.warmup_steps = 0             # the warmup's first lr is 0: no update at step 1
  cfg = MARConfig.from_dict(dict(c.model))
  tx = optim.make_optimizer(c.train, c.train.batch_size)
  state = loop._init_state(cfg, tx, 0)
  step = jax.jit(partial(train_step, graphdef=loop.graphdef_of(cfg), tx=tx, ema_rate=ema_rate,
                         latent_scale=1.0, patch_size=cfg.patch_size))
  return cfg, state, step


def test_ema_after_a_step_is_rate_times_old_plus_rest_times_new():
  cfg, state, step = _tiny_state(ema_rate=0.75)
  rng = np.random.default_rng(1)
  side = cfg.img_size // cfg.vae_stride
  batch = {'mean': rng.normal(size=(4, side, side, cfg.vae_embed_dim)).astype(np.float32),
           'logvar': np.full((4, side, side, cfg.vae_embed_dim), -30.0, np.float32),
           'label': np.arange(4, dtype=np.int32)}
  old_ema = jax.tree.map(np.asarray, state.ema)
  old_params = jax.tree.map(np.asarray, state.params)
  new, metrics = step(state, batch)
  assert float(metrics['finite']) == 1.0 and int(new.step) == 1
  moved = 0
  for (path, e_old), e_new, p_new, p_old in zip(
      jax.tree_util.tree_leaves_with_path(old_ema), jax.tree.leaves(new.ema),
      jax.tree.leaves(new.params), jax.tree.leaves(old_params), strict=True):
    np.testing.assert_allclose(np.asarray(e_new), 0.75 * e_old + 0.25 * np.asarray(p_new),
                               rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    moved += int(not np.array_equal(np.asarray(p_new), p_old))
  assert moved > 0                                    # the step did update the weights


class _Recorded(Exception):
  pass


def test_label_dropout_rate_and_unconditional_replacement(monkeypatch):
  cfg = MARConfig.from_dict(dict(digits_config(tiny=True).model, label_drop_prob=0.1))
  model = MAR(cfg, rngs=nnx.Rngs(0))
  seen = []

  def record(self, labels):
    seen.append(np.asarray(labels))
    raise _Recorded

  monkeypatch.setattr(MAR, 'class_embedding', record)
  n = 4000
  tokens = jnp.zeros((n, cfg.seq_len, cfg.token_embed_dim))
  labels = np.arange(n, dtype=np.int32) % cfg.class_num
  for train in (True, False):
    with pytest.raises(_Recorded):
      mar_loss(model, tokens, labels, jax.random.key(3), train=train)
  dropped, kept = seen
  frac = float((dropped == -1).mean())
  assert abs(frac - 0.1) < 3 * np.sqrt(0.1 * 0.9 / n)        # Bernoulli(0.1) per image
  assert np.array_equal(dropped[dropped != -1], labels[dropped != -1])
  assert np.array_equal(kept, labels)                           # no dropout at eval
  monkeypatch.undo()
  emb = np.asarray(model.class_embedding(jnp.asarray([-1, 3, -1, 0])))
  fake = np.asarray(model.fake_latent[...]).reshape(-1)
  table = np.asarray(model.class_emb.embedding[...])
  np.testing.assert_array_equal(emb[0], fake)
  np.testing.assert_array_equal(emb[2], fake)
  np.testing.assert_array_equal(emb[1], table[3])
  np.testing.assert_array_equal(emb[3], table[0])
  assert not any(np.allclose(fake, row) for row in table)
