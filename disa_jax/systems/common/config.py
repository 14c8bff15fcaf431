"""Config pieces FlowAR and xAR share (their files: `systems/flowar/config.py`,
`systems/xar/config.py`).

- `parse_config_arg`: the text after ':' in `--config=configs/<system>/<v>.py:ARG`: any of
  `cpu`, `tiny`, `digits`, comma-separated.
- `variant_key`: a variant letter from a letter, a long name or a prefixed name.
- `dataclass_from_dict`: a frozen architecture dataclass from its dict, rejecting unknown keys.
- `add_common_sections`: the `runtime` and `tokenizer` sections and the `train` / `data` sections
  (the shared recipe with per-system overrides, the bundled-digits override with `digits`).
"""

from __future__ import annotations

import dataclasses

from disa_jax.errors import UserError

LATENT_SCALE = 0.2325               # KL-16: latent = tokens / 0.2325 before decoding


def parse_config_arg(arg: str | None, label: str) -> dict:
  """{'cpu', 'tiny', 'digits'} -> bool from 'cpu' / 'tiny' / 'tiny,digits'; 'digits' trains on
  the bundled digits cache (1-channel 16x16 pixel tokens, 10 classes)."""
  out = {'cpu': False, 'tiny': False, 'digits': False}
  for item in (arg or '').split(','):
    if not item:
      continue
    if item not in out:
      raise UserError(f'unknown {label} config argument {item!r}; use cpu, tiny or digits')
    out[item] = True
  return out


def variant_key(name: str, *, label: str, long_names: dict, known) -> str:
  """The variant letter of `name`: case-insensitive, with or without the prefix '<label>-' /
  '<label>_', a long name from `long_names` ('HUGE' -> 'H'); must be in `known`."""
  prefix = label.upper()
  key = name.upper().removeprefix(f'{prefix}-').removeprefix(f'{prefix}_')
  key = long_names.get(key, key)
  if key not in known:
    raise UserError(f'unknown {label} variant {name!r}; choose {", ".join(known[:-1])} or '
                    f'{known[-1]}')
  return key


def dataclass_from_dict(cls, d: dict, label: str):
  """`cls(**d)`, with a one-line error naming the fields `cls` does not have."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise UserError(f'unknown {label} config fields {unknown}; expected a subset of '
                    f'{sorted(names)}')
  return cls(**d)


def config_name(system: str, key: str, opts: dict) -> str:
  """'<system>_<key>' with '-tiny' / '-cpu' and '-digits' as the options ask."""
  return (f'{system}_{key.lower()}' + ('-tiny' if opts['tiny'] else '-cpu' if opts['cpu'] else '')
          + ('-digits' if opts['digits'] else ''))


def add_common_sections(c, opts: dict, *, train_overrides: dict) -> None:
  """Adds `runtime`, `tokenizer`, `train` (shared recipe + `train_overrides`, label drop 0.1)
  and `data` to the ml_collections config `c`; `digits` switches to the bundled digits cache."""
  import ml_collections

  from disa_jax.config import data_config, train_config

  small = opts['cpu'] or opts['tiny']
  r = ml_collections.ConfigDict()
  r.matmul_precision = ''           # '' backend default, or 'highest' (parity runs)
  r.compilation_cache = '~/.cache/disa_jax/xla'
  r.num_devices = 0                 # 0 = all devices (batch data parallel over them)
  c.runtime = r
  t = ml_collections.ConfigDict()
  t.kind = 'none' if small else 'kl16'
  t.vae = ''                        # directory written by `disa-convert vae`
  t.scale = LATENT_SCALE
  c.tokenizer = t
  c.train = train_config(**train_overrides)
  c.train.label_drop_prob = 0.1
  c.data = data_config(latent_scale=LATENT_SCALE)
  if opts['digits']:
    from disa_jax.data.digits import TOKEN_SCALE

    t.update(kind='pixels', scale=TOKEN_SCALE)      # images = tokens / scale
    c.data.update(kind='digits', cache_dir='~/.cache/disa_jax/digits_cache', flip_prob=0.0,
                  latent_scale=TOKEN_SCALE)
    c.train.update(batch_size=16, num_steps=20, blr=0.016, warmup_steps=2,
                   lr_schedule='constant', log_every=5, checkpoint_every=10, ema_rate=0.995)


# The recipe of the bundled FlowAR / xAR digits models (`configs/{flowar,xar}/digits.py`):
# peak lr 1e-3 (blr 4e-3 at batch 64) after 50 warmup steps, cosine decay to 1e-5, EMA 0.995
# (a 200-step window, short against the run), 900 steps.
DIGITS_RECIPE = dict(batch_size=64, num_steps=900, blr=4e-3, warmup_steps=50,
                     lr_schedule='cosine', min_lr=1e-5, ema_rate=0.995, log_every=50,
                     checkpoint_every=100)


def bundled_checkpoint(name: str) -> str:
  """Path of a model shipped inside the package (`disa_jax/assets/<name>`)."""
  from pathlib import Path

  return str(Path(__file__).resolve().parents[2] / 'assets' / name)


def make_bundled_digits(c, asset: str) -> None:
  """Turns a `:cpu,digits` config into the bundled digits model's config: its checkpoint in
  the package, the training recipe that reproduces it, and 20-image sampling batches."""
  c.checkpoint = bundled_checkpoint(asset)
  c.train.update(**DIGITS_RECIPE)
  c.sampling.update(num_images=20, batch_size=20)

