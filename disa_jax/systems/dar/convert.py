"""Strict converters from the published D-AR checkpoints, and D-AR model directories.

  D-AR-tokenizer_v1.pt  {'ema', 'model', 'config', ...}: weights from 'ema' (else 'model', else
                        the file is the state dict); the embedded `config` (a pickled
                        config_util.Config, read through a restricted stub) gives the settings
                        that shapes cannot (queries, groups, steps, data_std, time_shift).
  D-AR-{L,XL}-360K.pt   {'model', 'optimizer', 'steps', 'args'}: weights from 'model' (what the
                        official sampling scripts load; `weights='ema'` picks 'ema' if present).
  *.safetensors         a bare state dict.

The official loaders are `strict=False`; these are strict: after stripping `_orig_mod.`, every
key of the architecture inferred from the shapes must be present with its exact shape and no
other key may appear, except the training-only ones (tokenizer: `diff_decoder.net.repa_out.*`,
`quantize.codebook_used`; GPT: `freqs_cis`, `causal_mask`, `*.kv_cache.*`). Nothing is written
unless everything matches; the model directory is written atomically (disa_jax.checkpoint).

Layout rules (torch -> flax): Linear weight (out, in) -> kernel (in, out); 1x1 conv
(out, in, 1, 1) -> kernel (in, out); patchify conv (D, 3, p, p) -> kernel (3 p p, D) over
(channel, row, column) patch features; LayerNorm weight -> scale; tables copied.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from disa_jax.errors import UserError
from disa_jax.systems.dar.gpt import GPT, GPTConfig
from disa_jax.systems.dar.tokenizer import Tokenizer, TokenizerConfig


class DarConversionError(UserError):
  """The checkpoint does not match a D-AR model; the message lists what is wrong."""


TOKENIZER_KIND, GPT_KIND = 'dar_tokenizer', 'dar_gpt'
TOKENIZER_DROP = (r'diff_decoder\.net\.repa_out\..*', r'quantize\.codebook_used')
GPT_DROP = (r'freqs_cis', r'causal_mask', r'.*\.kv_cache\..*')
# Settings not visible in the weights: name in the official config -> TokenizerConfig field.
OFFICIAL_SETTINGS = {
  'num_all_queries': 'num_queries', 'num_query_groups': 'num_groups',
  'queries_per_step': 'queries_per_group', 'num_denoising_steps': 'num_steps',
}
OFFICIAL_FLOW_SETTINGS = {'data_std': 'data_std', 'time_shift': 'time_shift'}


# ------------------------------------------------------------------------------ key tables
def _linear(tk, fp, bias=True):
  out = [(f'{tk}.weight', fp + ('kernel',), 'transpose')]
  return out + ([(f'{tk}.bias', fp + ('bias',), 'copy')] if bias else [])


def _norm(tk, fp):
  return [(f'{tk}.weight', fp + ('scale',), 'copy'), (f'{tk}.bias', fp + ('bias',), 'copy')]


def _attention(tk, fp):
  out = []
  for name in ('q', 'k', 'v', 'proj'):
    out += _linear(f'{tk}.{name}', fp + (name,))
  return out + _norm(f'{tk}.q_norm', fp + ('q_norm',)) + _norm(f'{tk}.k_norm', fp + ('k_norm',))


def _mlp(tk, fp):
  return _linear(f'{tk}.fc1', fp + ('fc1',)) + _linear(f'{tk}.fc2', fp + ('fc2',))


def tokenizer_key_table(cfg: TokenizerConfig) -> list[tuple[str, tuple, str]]:
  """(torch key, flax path, transform) for every tokenizer parameter."""
  t = [('patchify.weight', ('patchify', 'kernel'), 'patch'),
       ('patchify.bias', ('patchify', 'bias'), 'copy'),
       ('query_embedding.weight', ('query_embedding',), 'copy'),
       *_linear('query_linear', ('query_linear',)),
       ('quant_in_conv.weight', ('quant_in_conv', 'kernel'), 'conv1x1'),
       ('quant_out_conv.weight', ('quant_out_conv', 'kernel'), 'conv1x1'),
       ('quantize.embedding.weight', ('codebook',), 'copy'),
       ('decoder_embedding.weight', ('decoder_embedding',), 'copy')]
  for side, n in (('encoder_layers', cfg.encoder_layers), ('decoder_layers', cfg.decoder_layers)):
    for i in range(n):
      tk, fp = f'{side}.{i}', (side, i)
      t += [(f'{tk}.gate1', fp + ('gate1',), 'copy'), (f'{tk}.gate2', fp + ('gate2',), 'copy')]
      t += _attention(f'{tk}.attention', fp + ('attention',)) + _mlp(f'{tk}.mlp', fp + ('mlp',))
      t += _norm(f'{tk}.norm1', fp + ('norm1',)) + _norm(f'{tk}.norm2', fp + ('norm2',))
  net = 'diff_decoder.net'
  t += _linear(f'{net}.cond_mlp', ('flow', 'cond_mlp'))
  t += [(f'{net}.conv_in.weight', ('flow', 'conv_in', 'kernel'), 'conv1x1'),
        (f'{net}.conv_in.bias', ('flow', 'conv_in', 'bias'), 'copy'),
        (f'{net}.conv_out.weight', ('flow', 'conv_out', 'kernel'), 'conv1x1'),
        (f'{net}.conv_out.bias', ('flow', 'conv_out', 'bias'), 'copy')]
  for i in range(cfg.flow_depth):
    tk, fp = f'{net}.blocks.{i}', ('flow', 'blocks', i)
    t += _attention(f'{tk}.attention', fp + ('attention',))
    t += _attention(f'{tk}.cross_attn', fp + ('cross_attn',))
    t += _mlp(f'{tk}.mlp', fp + ('mlp',))
    t += _linear(f'{tk}.adaLN_modulation.1', fp + ('adaLN_modulation',))
    for torch_name, flax_name in (('time_embed.mlp', 'time_embed'), ('cond_embed', 'cond_embed')):
      t += _linear(f'{tk}.{torch_name}.0', fp + (flax_name, 'linear1'))
      t += _linear(f'{tk}.{torch_name}.2', fp + (flax_name, 'linear2'))
  return t


def gpt_key_table(cfg: GPTConfig) -> list[tuple[str, tuple, str]]:
  t = [('cls_embedding.embedding_table.weight', ('cls_embedding',), 'copy'),
       ('tok_embeddings.weight', ('tok_embeddings',), 'copy'),
       ('norm.weight', ('norm', 'weight'), 'copy'),
       ('output.weight', ('output', 'kernel'), 'transpose')]
  for i in range(cfg.n_layer):
    tk, fp = f'layers.{i}', ('layers', i)
    t += [(f'{tk}.attention.wqkv.weight', fp + ('attention', 'wqkv', 'kernel'), 'transpose'),
          (f'{tk}.attention.wo.weight', fp + ('attention', 'wo', 'kernel'), 'transpose')]
    for w in ('w1', 'w2', 'w3'):
      t.append((f'{tk}.feed_forward.{w}.weight', fp + ('feed_forward', w, 'kernel'), 'transpose'))
    t += [(f'{tk}.attention_norm.weight', fp + ('attention_norm', 'weight'), 'copy'),
          (f'{tk}.ffn_norm.weight', fp + ('ffn_norm', 'weight'), 'copy')]
  return t


def _to_flax(arr, transform):
  if transform == 'transpose':
    return arr.T
  if transform == 'conv1x1':
    return arr[:, :, 0, 0].T
  if transform == 'patch':
    return arr.reshape(arr.shape[0], -1).T
  return arr


def _torch_shape(shape, transform):
  if transform == 'transpose':
    return tuple(shape[::-1])
  if transform == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  if transform == 'patch':
    p = math.isqrt(shape[0] // 3)
    return (shape[1], 3, p, p)
  return tuple(shape)


def to_torch_state_dict(module, table) -> dict[str, np.ndarray]:
  """The inverse mapping (flax module -> official key names and layouts)."""
  flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  out = {}
  for key, path, transform in table:
    a = flat[path]
    if transform == 'transpose':
      a = a.T
    elif transform == 'conv1x1':
      a = a.T[:, :, None, None]
    elif transform == 'patch':
      a = a.T.reshape(_torch_shape(a.shape, 'patch'))
    out[key] = np.ascontiguousarray(a)
  return out


def fill_state(module_factory, table, sd: Mapping[str, np.ndarray], drop, what: str):
  """Strictly fills the abstract module from the torch state dict; returns the module."""
  abstract = nnx.eval_shape(module_factory)
  graphdef, state = nnx.split(abstract)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  table_paths = {path for _, path, _ in table}
  if table_paths != set(flat):   # a programming error, not a user error
    raise AssertionError(f'key table out of sync with the module: '
                         f'{sorted(set(flat) ^ table_paths)[:5]}')
  check_shapes({k: np.shape(v) for k, v in sd.items()}, table, flat, drop, what)
  values = {path: np.ascontiguousarray(_to_flax(np.asarray(sd[key], np.float32), transform))
            for key, path, transform in table}
  import jax.numpy as jnp
  new = nnx.from_flat_state([(p, v.replace(jnp.asarray(values[tuple(p)])) if tuple(p) in values
                              else v) for p, v in nnx.to_flat_state(state)])
  return nnx.merge(graphdef, new)


def check_shapes(shapes: Mapping[str, tuple], table, flat, drop, what: str) -> None:
  expected = {key: _torch_shape(tuple(flat[path].shape), tr) for key, path, tr in table}
  dropped = [re.compile(p) for p in drop]
  missing = sorted(k for k in expected if k not in shapes)
  unexpected = sorted(k for k in shapes if k not in expected
                      and not any(d.fullmatch(k) for d in dropped))
  mismatched = [f'{k}: checkpoint {tuple(shapes[k])}, model {expected[k]}'
                for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
  if missing or unexpected or mismatched:
    lines = [f'checkpoint does not match the {what}:']
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('shape mismatches', mismatched)):
      if items:
        shown = ', '.join(items[:8]) + (f', ... ({len(items) - 8} more)' if len(items) > 8 else '')
        lines.append(f'  {len(items)} {title}: {shown}')
    raise DarConversionError('\n'.join(lines))


# -------------------------------------------------------------------------- shape inference
def _need(shapes, key, what):
  if key not in shapes:
    raise DarConversionError(f'checkpoint is not a {what}: key {key} is missing')
  return tuple(shapes[key])


def _count(shapes, pattern):
  rx = re.compile(pattern)
  idx = {int(m.group(1)) for k in shapes if (m := rx.match(k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise DarConversionError(f'layer indices of {pattern} are not contiguous: {sorted(idx)}')
  return max(idx) + 1 if idx else 0


def infer_tokenizer_config(shapes: Mapping[str, tuple], settings: Mapping | None = None
                           ) -> TokenizerConfig:
  """TokenizerConfig from the shapes plus `settings` (fields shapes cannot show)."""
  what = 'D-AR tokenizer'
  width, _, patch, _ = _need(shapes, 'patchify.weight', what)
  table, rank = _need(shapes, 'query_embedding.weight', what)
  codebook, vq_dim = _need(shapes, 'quantize.embedding.weight', what)
  flow_width, fin, _, _ = _need(shapes, 'diff_decoder.net.conv_in.weight', what)
  flow_patch = math.isqrt(fin // 3)
  arch = dict(patch_size=patch, width=width, table_size=table, query_rank=rank,
              codebook_size=codebook, vq_dim=vq_dim, flow_width=flow_width,
              flow_patch=flow_patch,
              encoder_layers=_count(shapes, r'encoder_layers\.(\d+)\.'),
              decoder_layers=_count(shapes, r'decoder_layers\.(\d+)\.'),
              flow_depth=_count(shapes, r'diff_decoder\.net\.blocks\.(\d+)\.'))
  extra = dict(settings or {})
  clash = sorted(k for k in extra if k in arch and extra[k] != arch[k])
  if clash:
    raise DarConversionError(
      'settings contradict the checkpoint shapes: ' +
      ', '.join(f'{k} {extra[k]} (weights: {arch[k]})' for k in clash))
  try:
    return TokenizerConfig.from_dict({**extra, **arch})
  except UserError as e:
    raise DarConversionError(f'checkpoint gives an invalid D-AR tokenizer: {e}') from None


def infer_gpt_config(shapes: Mapping[str, tuple], settings: Mapping | None = None) -> GPTConfig:
  what = 'D-AR GPT'
  vocab, dim = _need(shapes, 'tok_embeddings.weight', what)
  classes = _need(shapes, 'cls_embedding.embedding_table.weight', what)[0] - 1
  hidden = _need(shapes, 'layers.0.feed_forward.w1.weight', what)[0]
  if dim % 64:
    raise DarConversionError(f'GPT width {dim} is not a multiple of the head size 64')
  arch = dict(dim=dim, n_head=dim // 64, vocab_size=vocab, num_classes=classes,
              n_layer=_count(shapes, r'layers\.(\d+)\.'), ffn_hidden=hidden)
  extra = dict(settings or {})
  try:
    return GPTConfig.from_dict({**extra, **arch})
  except UserError as e:
    raise DarConversionError(f'checkpoint gives an invalid D-AR GPT: {e}') from None


# ------------------------------------------------------------------------------------ reading
class _OfficialConfig:
  """Stand-in for config_util.Config when unpickling a tokenizer file (holds `_data` only)."""

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})

  def as_dict(self) -> dict:
    data = self.__dict__.get('_data', {})
    return data if isinstance(data, dict) else {}


def read_checkpoint(path) -> tuple[dict, dict | None]:
  """(top-level object as a dict, embedded official config dict or None) of a weights file.
  .safetensors: ({'': state dict}, None)."""
  from disa_jax.convert import torch_io

  try:
    p = torch_io._weights_file(path)
    if p.endswith('.safetensors'):
      return {'': torch_io._read_safetensors(p)}, None
    import torch

    with torch.serialization.safe_globals([(_OfficialConfig, 'config_util.Config')]):
      obj = torch_io._torch_load(p)
  except torch_io.CheckpointReadError as e:
    raise DarConversionError(str(e)) from None
  if not isinstance(obj, Mapping):
    raise DarConversionError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict')
  cfg = obj.get('config')
  cfg = cfg.as_dict() if isinstance(cfg, _OfficialConfig) else (
    dict(cfg) if isinstance(cfg, Mapping) else None)
  return dict(obj), cfg


def _strip(sd: Mapping) -> dict:
  return {(k[len('_orig_mod.'):] if k.startswith('_orig_mod.') else k): v for k, v in sd.items()}


def _select(obj: dict, entries, path) -> tuple[dict[str, np.ndarray], str]:
  import torch

  def tensors(d):
    return {str(k): (v.detach().to(torch.float32).numpy() if isinstance(v, torch.Tensor)
                     else np.asarray(v, np.float32))
            for k, v in d.items() if isinstance(v, torch.Tensor | np.ndarray)}

  if '' in obj and isinstance(obj[''], Mapping):          # safetensors
    return _strip(obj['']), ''
  for e in entries:
    if isinstance(obj.get(e), Mapping):
      return _strip(tensors(obj[e])), e
  bare = tensors(obj)
  if bare:
    return _strip(bare), ''
  for d in obj.values():
    if isinstance(d, Mapping):
      fam = _family(_strip(d))
      if fam:
        raise DarConversionError(f'{path} holds {fam}; convert it with the matching converter '
                                 '(convert_tokenizer for the tokenizer, convert_gpt for a GPT)')
  have = ', '.join(repr(k) for k in obj) or 'nothing'
  raise DarConversionError(f'{path} has no {" or ".join(map(repr, entries))} entry and is not '
                           f'a state dict (it holds {have})')


def _family(sd: Mapping) -> str | None:
  if 'patchify.weight' in sd or 'diff_decoder.net.conv_in.weight' in sd:
    return 'a D-AR tokenizer'
  if 'tok_embeddings.weight' in sd:
    return 'a D-AR GPT'
  return None


def _expect_family(sd, want, path):
  got = _family(sd)
  if got != want:
    hint = ('convert it with convert_tokenizer' if got == 'a D-AR tokenizer' else
            'convert it with convert_gpt' if got == 'a D-AR GPT' else
            f'first keys: {", ".join(list(sd)[:4])}')
    raise DarConversionError(f'{path} is not {want} checkpoint ({hint})')


def tokenizer_settings_from_official(cfg: Mapping | None) -> dict:
  """TokenizerConfig fields from an official config dict ({'model': {...}} or the model part)."""
  if not cfg:
    return {}
  model = cfg.get('model', cfg)
  out = {ours: model[theirs] for theirs, ours in OFFICIAL_SETTINGS.items() if theirs in model}
  flow = model.get('diff_decoder', {}) or {}
  out.update({ours: float(flow[theirs]) for theirs, ours in OFFICIAL_FLOW_SETTINGS.items()
              if theirs in flow})
  if 'sampling_resolution' in model:
    out['image_size'] = int(model['sampling_resolution'])
  return out


# ---------------------------------------------------------------------------------- convert
def convert_tokenizer(torch_checkpoint, out, *, settings: Mapping | None = None,
                      weights: str = 'ema', overwrite: bool = False,
                      variant: str | None = None) -> Path:
  """D-AR-tokenizer_v1.pt (or a .safetensors state dict) -> tokenizer model directory
  (`disa-convert dar-tokenizer`).

  weights: 'ema' (preferred by the official loader) or 'model' (= 'raw'). settings:
  TokenizerConfig fields the weights do not show; the file's embedded config is used first,
  then these.
  """
  _no_variant(variant)
  weights = 'model' if weights == 'raw' else weights
  if weights not in ('ema', 'model'):
    raise DarConversionError(f'weights must be ema or model, got {weights!r}')
  out = _check_output(out, overwrite)
  obj, official = read_checkpoint(torch_checkpoint)
  entries = ('ema', 'model') if weights == 'ema' else ('model',)
  sd, entry = _select(obj, entries, torch_checkpoint)
  _expect_family(sd, 'a D-AR tokenizer', torch_checkpoint)
  cfg = infer_tokenizer_config(_shapes(sd), {**tokenizer_settings_from_official(official),
                                             **dict(settings or {})})
  model = fill_state(lambda: Tokenizer(cfg, rngs=nnx.Rngs(0)), tokenizer_key_table(cfg), sd,
                     TOKENIZER_DROP, 'D-AR tokenizer')
  meta = {'source': str(Path(torch_checkpoint).expanduser().absolute()), 'source_entry': entry,
          'converted_by': 'disa_jax.systems.dar.convert.convert_tokenizer'}
  return save_tokenizer(model, out, meta=meta, overwrite=overwrite)


def convert_gpt(torch_checkpoint, out, *, settings: Mapping | None = None,
                weights: str = 'model', overwrite: bool = False) -> Path:
  """D-AR-{L,XL}-360K.pt (or .safetensors) -> GPT model directory ('model' entry by default,
  as the official sampling scripts)."""
  if weights not in ('model', 'ema', 'auto'):
    raise DarConversionError(f'weights must be model, ema or auto, got {weights!r}')
  out = _check_output(out, overwrite)
  obj, _ = read_checkpoint(torch_checkpoint)
  entries = {'model': ('model', 'module', 'state_dict'), 'ema': ('ema',),
             'auto': ('ema', 'model', 'module', 'state_dict')}[weights]
  sd, entry = _select(obj, entries, torch_checkpoint)
  _expect_family(sd, 'a D-AR GPT', torch_checkpoint)
  cfg = infer_gpt_config(_shapes(sd), settings)
  model = fill_state(lambda: GPT(cfg, rngs=nnx.Rngs(0)), gpt_key_table(cfg), sd, GPT_DROP,
                     'D-AR GPT')
  meta = {'source': str(Path(torch_checkpoint).expanduser().absolute()), 'source_entry': entry,
          'converted_by': 'disa_jax.systems.dar.convert.convert_gpt'}
  return save_gpt(model, out, meta=meta, overwrite=overwrite)


def convert(torch_checkpoint, out, *, weights: str = 'ema', variant: str | None = None,
            overwrite: bool = False) -> Path:
  """`disa-convert dar`: a D-AR GPT file -> GPT model directory. weights 'ema' (the CLI
  default) takes the 'ema' entry when the file has one, else 'model' (the published
  D-AR-{L,XL}-360K.pt have no EMA; 'model' is what the official sampling loads); 'raw' =
  'model'. The architecture (L / XL) is read from the shapes."""
  _no_variant(variant)
  if weights not in ('ema', 'raw'):
    raise DarConversionError(f'--weights must be ema or raw, got {weights!r}')
  return convert_gpt(torch_checkpoint, out, weights='auto' if weights == 'ema' else 'model',
                     overwrite=overwrite)


def _no_variant(variant):
  if variant is not None:
    raise DarConversionError(f'--variant={variant} is a MAR option; D-AR reads the architecture '
                             'from the checkpoint shapes (drop --variant)')


def _shapes(sd):
  return {k: tuple(np.shape(v)) for k, v in sd.items()}


def _check_output(out, overwrite):
  out = Path(os.path.expanduser(os.fspath(out)))
  if out.exists() and not overwrite:
    raise DarConversionError(f'output {out} already exists; choose another path or pass '
                             'overwrite')
  if out.exists() and not (out / 'meta.json').exists():
    raise DarConversionError(f'refusing to overwrite {out}: it is not a model directory')
  return out


# --------------------------------------------------------------------------- model directories
def save_tokenizer(model: Tokenizer, out, *, meta: dict | None = None, overwrite=False) -> Path:
  from disa_jax.checkpoint import save_model

  return save_model(out, model, kind=TOKENIZER_KIND, model_config=model.cfg.to_dict(),
                    meta=meta, overwrite=overwrite)


def save_gpt(model: GPT, out, *, meta: dict | None = None, overwrite=False) -> Path:
  from disa_jax.checkpoint import save_model

  return save_model(out, model, kind=GPT_KIND, model_config=model.cfg.to_dict(), meta=meta,
                    overwrite=overwrite)


def _load(directory, kind, build, from_dict, overrides):
  from disa_jax.checkpoint import CheckpointError, read_meta, restore_params

  try:
    meta, stored = read_meta(directory)
  except CheckpointError as e:
    raise UserError(str(e)) from None
  if meta.get('kind') != kind:
    raise UserError(f'{directory} holds a {meta.get("kind")!r} model, not {kind!r}')
  cfg = from_dict({**stored, **(overrides or {})})
  abstract = nnx.eval_shape(lambda: build(cfg))
  graphdef, state = nnx.split(abstract)
  try:
    state = restore_params(directory, state)
  except CheckpointError as e:
    raise UserError(str(e)) from None
  return nnx.merge(graphdef, state)


def load_tokenizer(directory) -> Tokenizer:
  return _load(directory, TOKENIZER_KIND, lambda c: Tokenizer(c, rngs=nnx.Rngs(0)),
               TokenizerConfig.from_dict, None)


def load_gpt(directory, *, dtype: str | None = None, block_size: int | None = None) -> GPT:
  """GPT model directory -> GPT (dtype 'bfloat16' casts the weights, as the official runs;
  block_size, the number of ids generated, is not in the weights: given, it replaces the
  stored one)."""
  overrides = {**({'dtype': dtype} if dtype else {}),
               **({'block_size': int(block_size)} if block_size else {})}
  model = _load(directory, GPT_KIND, lambda c: GPT(c, rngs=nnx.Rngs(0)), GPTConfig.from_dict,
                overrides or None)
  if model.cfg.dtype == 'bfloat16':
    import jax.numpy as jnp

    from disa_jax.systems.dar.gpt import cast_params
    cast_params(model, jnp.bfloat16)
  return model
