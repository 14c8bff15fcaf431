"""The JAX head loop against outputs of the *official* LTH14/mar code (not our reference).

tests/data/mar_official_head_golden.npz was written once by `tools/make_official_golden.py`
from an unmodified checkout of LTH14/mar (`DiffLoss.sample` = `SimpleMLPAdaLN` +
`SpacedDiffusion.p_sample_loop`), with fixed weights (scale 0.1) and every random draw saved.
A misreading of the official algebra shared by this package and `reference/mar.py` would
pass the reference parity tests but fail here. Both head paths are checked (precomputed
adaLN modulations, and the per-step path a budget of 0 forces).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import max_rel_error

from disa_jax.convert.mapping import convert_state_dict
from disa_jax.diffusion.ddpm import MODULATION_BUDGET_BYTES, device_tables, p_sample_loop
from disa_jax.heads.mlp_adaln import SimpleMLPAdaLN

GOLDEN = Path(__file__).parent / 'data' / 'mar_official_head_golden.npz'


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(GOLDEN))


@pytest.fixture(scope='module')
def net(golden):
  w = {k.removeprefix('w/'): v for k, v in golden.items() if k.startswith('w/')}
  width = w['input_proj.weight'].shape[0]
  depth = len({k.split('.')[1] for k in w if k.startswith('res_blocks.')})
  in_ch, z_ch = w['input_proj.weight'].shape[1], w['cond_embed.weight'].shape[1]
  gd, abstract = nnx.split(nnx.eval_shape(lambda: SimpleMLPAdaLN(
    in_ch, width, 2 * in_ch, z_ch, depth, rngs=nnx.Rngs(0))))
  return nnx.merge(gd, convert_state_dict(w, abstract))


@pytest.mark.parametrize('budget', [MODULATION_BUDGET_BYTES, 0], ids=['precomputed', 'per_step'])
@pytest.mark.parametrize('case', ['plain', 'cfg', 'steps25'])
def test_head_matches_official_outputs(golden, net, case, budget):
  steps, cfg, temp, n = golden[f'{case}/meta']
  steps, n = int(steps), int(n)
  z = jnp.asarray(golden[f'{case}/z'])
  zc, zu = (z[:n], z[n:]) if cfg != 1.0 else (z, None)
  x = jnp.asarray(golden[f'{case}/x_init'])
  eps = jnp.asarray(golden[f'{case}/step_noise'][:, :n])     # the official uncond half is unused
  assert eps.shape[0] == steps
  with jax.default_matmul_precision('highest'):
    got = p_sample_loop(net, zc, zu, x, device_tables(steps, None), num_steps=steps,
                        cfg=jnp.float32(cfg), temperature=jnp.float32(temp),
                        noise_at=lambda i: eps[i], modulation_budget=budget)
  want = golden[f'{case}/tokens']
  assert np.abs(want).max() > 0.5                       # the golden tokens are not trivial
  assert max_rel_error(got, want) < 1e-5, max_rel_error(got, want)
