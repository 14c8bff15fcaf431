"""The strict conversion pipeline FlowAR and xAR share (their rules: `systems/flowar/convert.py`,
`systems/xar/convert.py`).

An official checkpoint of either is a flat float32 state dict of parameters plus buffers that
the model recomputes (the attention `mask`, RoPE tables). A `BufferedConverter` holds a system's
rules (`infer_config` from the shapes, `is_buffer`, `expected_buffers` recomputed from the config,
`buffer_matches` per buffer, the nnx model class, the one-line `fail`) and runs the same steps
for both: dtype / finiteness of every entry, the config from the shapes, buffer keys and shapes,
buffer values, then every parameter through `convert.mapping` (missing / unexpected / misshaped
keys are one-line errors; linear weights become (in, out) kernels). `convert` writes a model
directory atomically (nothing is written unless everything matches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.checkpoint import CheckpointError
from disa_jax.convert.mapping import ConversionError, check_state_dict, convert_state_dict


@dataclasses.dataclass(frozen=True)
class BufferedConverter:
  """One system's conversion rules; the methods are the shared strict pipeline."""

  label: str                        # 'FlowAR' / 'xAR' (in messages)
  kind: str                         # model-directory kind and `disa-convert` subcommand
  model_cls: type
  fail: Callable[[str], None]       # raises the system's ConversionError (one line)
  infer_config: Callable
  is_buffer: Callable[[str], bool]
  expected_buffers: Callable        # cfg -> {key: array}
  buffer_matches: Callable          # (key, got, want) -> bool

  def abstract(self, cfg):
    """(graphdef, abstract state) of the model of `cfg` (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: self.model_cls(cfg, rngs=nnx.Rngs(0))))

  def check_buffer_shapes(self, shapes: Mapping[str, tuple], expected: Mapping[str, np.ndarray]):
    have = {k for k in shapes if self.is_buffer(k)}
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
    what = f'checkpoint does not match the {self.label} model'
    if missing:
      self.fail(f'{what}: {len(missing)} missing buffer(s): {", ".join(missing[:6])}')
    if extra:
      self.fail(f'{what}: {len(extra)} unexpected key(s): {", ".join(extra[:6])}')
    for k, want in expected.items():
      if tuple(shapes[k]) != want.shape:
        self.fail(f'{what}: {k} has shape {tuple(shapes[k])}, expected {want.shape}')

  def check_buffer_values(self, sd: Mapping[str, np.ndarray],
                          expected: Mapping[str, np.ndarray]):
    for k, want in expected.items():
      if not self.buffer_matches(k, np.asarray(sd[k]), want):
        self.fail(f'buffer {k} differs from the value {self.label} computes; the file is not an '
                  f'official {self.label} checkpoint (or was edited)')

  def check_values(self, sd: Mapping[str, np.ndarray]):
    """dtype (floating) and finiteness of every entry (the mask may hold -inf)."""
    for k, v in sd.items():
      v = np.asarray(v)
      if not np.issubdtype(v.dtype, np.floating):
        self.fail(f'checkpoint key {k} has dtype {v.dtype}; {self.label} weights must be '
                  'floating point (float32 as saved officially)')
      if k != 'mask' and not np.all(np.isfinite(v)):
        self.fail(f'checkpoint key {k} contains non-finite values (NaN/inf); the file is corrupt')

  def check_shapes(self, shapes: Mapping[str, tuple]):
    """Shape-only dry run of the conversion (nothing allocated): the inferred config after the
    same strict key / shape validation."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    cfg = self.infer_config(shapes)
    self.check_buffer_shapes(shapes, self.expected_buffers(cfg))
    try:
      check_state_dict({k: v for k, v in shapes.items() if not self.is_buffer(k)},
                       self.abstract(cfg)[1], what=f'{self.label} model')
    except ConversionError as e:
      self.fail(str(e).replace('\n', ' '))
    return cfg

  def convert_state(self, sd: Mapping[str, np.ndarray]):
    """(config, graphdef, filled nnx state) from an official state dict; strict."""
    shapes = {k: tuple(np.shape(v)) for k, v in sd.items()}
    self.check_values(sd)
    cfg = self.infer_config(shapes)
    graphdef, abstract = self.abstract(cfg)
    expected = self.expected_buffers(cfg)
    self.check_buffer_shapes(shapes, expected)
    self.check_buffer_values(sd, expected)
    params = {k: np.asarray(v, np.float32) for k, v in sd.items() if not self.is_buffer(k)}
    try:
      state = convert_state_dict(params, abstract, what=f'{self.label} model')
    except ConversionError as e:
      self.fail(str(e).replace('\n', ' '))
    return cfg, graphdef, state

  def convert(self, torch_checkpoint, out, *, overwrite: bool, variant: str | None,
              state_dict: Callable[[], Mapping], official: Callable, save: Callable,
              error: type) -> Path:
    """`disa-convert <kind>`: the checked output path, the converted state of `state_dict()`,
    the architecture compared with `official(variant)` when a variant is given, then
    `save(out, model, meta=, overwrite=)` (atomic)."""
    from disa_jax.convert.source import check_output

    try:
      out = check_output(out, overwrite)
    except CheckpointError as e:
      raise error(str(e)) from None
    cfg, graphdef, state = self.convert_state(state_dict())
    if variant is not None and official(variant) != cfg:
      self.fail(f'checkpoint shapes give {cfg}, not {self.label}-{variant.upper()}; drop '
                '--variant or pass the matching file')
    meta = {'source': str(Path(torch_checkpoint).expanduser().absolute()),
            'converted_by': f'disa-convert {self.kind}'}
    return save(out, nnx.merge(graphdef, state), meta=meta, overwrite=overwrite)
