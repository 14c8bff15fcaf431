"""Writes tests/data/mar_official_head_golden.npz with the *official* LTH14/mar diffusion head.

  python tools/make_official_golden.py --official=/path/to/LTH14/mar [--out=tests/data/...npz]

`--official` is a checkout of https://github.com/LTH14/mar (not part of this repository; none
of its code is copied here). The script imports its `models/diffloss.py` (`DiffLoss`,
`SimpleMLPAdaLN`) and `diffusion/` (`create_diffusion`, `SpacedDiffusion.p_sample_loop`)
unchanged. Those modules need only torch and numpy: no timm or torchvision stub is needed.
The one patch is `torch.Tensor.cuda` to the identity (`DiffLoss.sample` moves its noise to
the GPU; this machine has none).

Fixed weights (one set for every case; every parameter N(0, SCALE^2), LayerNorm weights
1 + N(0, SCALE^2): the official init zeroes the adaLN and output layers), fixed conditions
z, and every random draw injected:
`torch.randn` (the initial noise of `DiffLoss.sample`) and `torch.randn_like` (each
`p_sample` step) are replaced by draws from a numpy generator, and the draws are saved. The
test (`tests/test_official_golden.py`) loads the weights into the JAX head, feeds the same
draws to `disa_jax.diffusion.ddpm.p_sample_loop`, and compares the tokens. A misreading of
the official algebra shared by the project and its own reference (`reference/mar.py`) cannot
hide there.

Not covered: the MAR backbone (`models/mar.py` builds on timm's `Block`, and timm needs
torchvision, which cannot be installed here); the backbone's parity stays with
`reference/mar.py` (tests/test_sampler.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SCALE = 0.1
# (name, respaced steps, cfg, temperature, rows N)
CASES = [('plain', '6', 1.0, 1.0, 5), ('cfg', '5', 3.0, 0.9, 4), ('steps25', '25', 1.5, 1.0, 3)]
IN_CH, Z_CH, WIDTH, DEPTH = 16, 64, 64, 2


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--official', required=True, help='checkout of github.com/LTH14/mar')
  p.add_argument('--out', default=str(Path(__file__).resolve().parent.parent / 'tests' / 'data'
                                      / 'mar_official_head_golden.npz'))
  a = p.parse_args(argv)
  root = Path(a.official).resolve()
  if not (root / 'models' / 'diffloss.py').is_file():
    print(f'error: {root} is not a checkout of LTH14/mar (models/diffloss.py missing)',
          file=sys.stderr)
    return 2
  import torch

  sys.path.insert(0, str(root))
  from models.diffloss import DiffLoss  # noqa: E402  (the official module)

  torch.Tensor.cuda = lambda self, *args, **kw: self
  rng = np.random.default_rng(2024)
  out = {'scale': np.float32(SCALE)}
  for name, steps, cfg, temp, n in CASES:
    torch.manual_seed(0)
    loss = DiffLoss(IN_CH, Z_CH, DEPTH, WIDTH, num_sampling_steps=steps).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
      for pname, prm in loss.net.named_parameters():
        r = torch.randn(prm.shape, generator=g) * SCALE
        is_ln = 'norm' in pname or '_ln' in pname
        prm.copy_(1.0 + r if is_ln and pname.endswith('weight') else r)
    rows = 2 * n if cfg != 1.0 else n
    z = rng.standard_normal((rows, Z_CH)).astype(np.float32)
    draws = []

    def randn(*shape, draws=draws, **kw):
      shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
      d = rng.standard_normal(shape).astype(np.float32)
      draws.append(d)
      return torch.from_numpy(d.copy())

    real_randn, real_like = torch.randn, torch.randn_like
    torch.randn = randn
    torch.randn_like = lambda x, **kw: randn(*x.shape)
    try:
      with torch.no_grad():
        tokens = loss.sample(torch.from_numpy(z), temperature=temp, cfg=cfg).numpy()
    finally:
      torch.randn, torch.randn_like = real_randn, real_like
    if not np.isfinite(tokens).all():
      print(f'error: case {name}: official tokens are not finite; lower SCALE', file=sys.stderr)
      return 1
    out[f'{name}/z'] = z
    out[f'{name}/x_init'] = draws[0]                      # [N, C] (duplicated under CFG)
    out[f'{name}/step_noise'] = np.stack(draws[1:])       # [A, rows, C], noisiest step first
    out[f'{name}/tokens'] = tokens[:n]
    out[f'{name}/meta'] = np.array([int(steps), cfg, temp, n], np.float64)
    for pname, t in loss.net.state_dict().items():   # the same weights in every case
      out[f'w/{pname}'] = t.numpy()
  tmp = Path(a.out).with_suffix('.tmp.npz')
  np.savez_compressed(tmp, **out)
  tmp.replace(a.out)
  print(f'wrote {a.out} ({", ".join(c[0] for c in CASES)})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
