"""`disa-convert inception`: the FID Inception-v3 weights -> a disa_jax model directory.

  disa-convert inception --torch-checkpoint pt_inception-2015-12-05-6726825d.pth --out ckpt/inc

Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` has the same keys) with `weights_only=True`, or a
`.safetensors` file with the same keys. Every key must map onto `disa_jax.eval.inception.
InceptionV3` with the right shape (conv OIHW -> HWIO, fc weight transposed, BatchNorm weight ->
scale, running_mean / running_var kept by name); `*.num_batches_tracked` counters are dropped
(inference does not use them). Anything else missing, unexpected or mis-shaped is an error
listing the keys, and nothing is written. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from disa_jax.checkpoint import save_model
from disa_jax.convert.mapping import ConversionError, convert_state_dict
from disa_jax.convert.torch_io import load_state_dict

DROPPED_SUFFIX = '.num_batches_tracked'


def convert(torch_checkpoint, out, *, weights=None, variant=None, overwrite=False) -> Path:
  """Converts the FID Inception weights file; `weights` / `variant` do not apply (ignored)."""
  del weights, variant
  from disa_jax.eval.inception import InceptionV3

  state_dict, _ = load_state_dict(torch_checkpoint, fallback_keys=('state_dict',))
  state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()
                if not k.endswith(DROPPED_SUFFIX)}
  if not any(k.startswith('Mixed_') for k in state_dict):
    raise ConversionError(
      f'{torch_checkpoint} does not look like the FID Inception-v3 weights (no Mixed_* keys); '
      'expected pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or '
      'weights-inception-2015-12-05-6726825d.pth (torch-fidelity)')
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = convert_state_dict(state_dict, state, what='FID Inception-v3')
  model = nnx.merge(graphdef, state)
  meta = {'source': os.path.basename(os.fspath(torch_checkpoint)),
          'features': {'pool': 2048, 'logits_unbiased': 1008, 'spatial': 2023}}
  return save_model(out, model, kind='inception', overwrite=overwrite,
                    model_config={'architecture': 'fid_inception_v3', 'input_size': 299,
                                  'num_logits': 1008, 'bn_eps': 1e-3},
                    meta=meta)
