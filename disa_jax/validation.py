"""Range and finiteness validation of config fields, and of sampled batches.

`validate_config(config)` checks every numeric field of the sections a config has
(`sampling`, `train`, `data`, `runtime`) against the table `RULES` below: a value that is
not a number, not finite, or outside its range raises `InvalidConfigError` (a `UserError`)
naming the field (as the `--config.section.field` override that sets it) and the valid range.
Fields a config does not have are skipped, so partial configs (bench, demo) validate too.

`check_finite_batch(tokens, ...)` is the cheap host-side check where sampled tokens come
back from the devices: a batch with NaN/Inf is an error naming the likely causes, raised
before anything of it is written.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from disa_jax.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000     # the diffusion head's training timesteps (0 .. 999)


class InvalidConfigError(UserError):
  """A config field (or the flag that sets it) has a value outside its valid range."""


class NonFiniteOutputError(UserError):
  """A sampled batch holds NaN/Inf values; nothing of it was written."""


@dataclasses.dataclass(frozen=True)
class Rule:
  lo: float | None = None          # inclusive lower bound (None: unbounded)
  hi: float | None = None          # inclusive upper bound
  integer: bool = False
  lo_open: bool = False            # lo itself excluded (> lo)
  hi_open: bool = False            # hi itself excluded (< hi)
  also: tuple = ()                 # extra allowed values outside the range (e.g. -1 = off)
  optional: bool = False           # None allowed (placeholder: default of the preset)
  meaning: str = ''

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      rng = f'{"(" if self.lo_open else "["}{_num(self.lo)}, {_num(self.hi)}' \
            f'{")" if self.hi_open else "]"}'
      rng = f'in {rng}'
    elif self.lo is not None:
      rng = f'{">" if self.lo_open else ">="} {_num(self.lo)}'
    elif self.hi is not None:
      rng = f'{"<" if self.hi_open else "<="} {_num(self.hi)}'
    else:
      rng = ''
    kind = 'an integer' if self.integer else 'a finite number'
    extra = ''.join(f' or {_num(v)}' for v in self.also)
    return f'{kind} {rng}{extra}'.rstrip() + (f' ({self.meaning})' if self.meaning else '')

  def ok(self, v) -> bool:
    if v in self.also:
      return True
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
      return False
    return True


def _num(v) -> str:
  return str(int(v)) if float(v).is_integer() else repr(float(v))


MAX_STEPS = NUM_TRAIN_TIMESTEPS
RULES: dict[str, dict[str, Rule]] = {
  'sampling': {
    'cfg': Rule(0.0, 100.0, meaning='classifier-free guidance scale; 1 = off, 0 = unconditional'),
    'temperature': Rule(0.0, 100.0, lo_open=True, meaning='diffusion-noise temperature'),
    'max_timestep': Rule(1, NUM_TRAIN_TIMESTEPS - 1, integer=True, also=(-1,), optional=True,
                         meaning='timestep clamp; -1 = no clamp'),
    'upper_steps': Rule(1, MAX_STEPS, integer=True, meaning='diffusion steps'),
    'lower_steps': Rule(1, MAX_STEPS, integer=True, meaning='diffusion steps'),
    'num_iter': Rule(1, None, integer=True, meaning='AR steps'),
    'num_images': Rule(1, None, integer=True),
    'batch_size': Rule(1, None, integer=True),
    'seed': Rule(0, 2**63 - 1, integer=True),
  },
  'train': {
    'batch_size': Rule(1, None, integer=True),
    'num_steps': Rule(1, None, integer=True),
    'blr': Rule(0.0, 1.0, lo_open=True, meaning='base learning rate; lr = blr * batch / 256'),
    'lr': Rule(0.0, 1.0, meaning='absolute learning rate; 0 = use blr'),
    'warmup_steps': Rule(0, None, integer=True),
    'min_lr': Rule(0.0, 1.0),
    'weight_decay': Rule(0.0, 10.0),
    'b1': Rule(0.0, 1.0, hi_open=True, meaning='Adam beta1'),
    'b2': Rule(0.0, 1.0, hi_open=True, meaning='Adam beta2'),
    'grad_clip': Rule(0.0, None, meaning='global-norm clip; 0 = off'),
    'ema_rate': Rule(0.0, 1.0, meaning='EMA decay per update'),
    'last_t_fraction': Rule(0.0, 1.0, hi_open=True,
                            meaning='MAR: fraction of head rows trained at t = T-1'),
    'seed': Rule(0, 2**31 - 2, integer=True),
    'log_every': Rule(1, None, integer=True),
    'checkpoint_every': Rule(1, None, integer=True),
    'keep_checkpoints': Rule(1, None, integer=True),
    'num_devices': Rule(0, None, integer=True, meaning='0 = all devices'),
    'fsdp': Rule(1, None, integer=True),
  },
  'data': {
    'flip_prob': Rule(0.0, 1.0, meaning='probability of the flipped moments'),
    'latent_scale': Rule(0.0, None, meaning="0 = the cache's scale"),
  },
  'runtime': {
    'enc_bucket': Rule(0, None, integer=True, meaning='0 = auto'),
    'max_head_waste': Rule(0.0, 1.0, meaning='padding budget per head bucket'),
    'num_devices': Rule(0, None, integer=True, meaning='0 = all devices'),
    'compile_threads': Rule(1, 64, integer=True),
  },
  'tokenizer': {
    'scale': Rule(0.0, None, lo_open=True, meaning='token = latent * scale'),
  },
}


def check_value(section: str, name: str, value, rule: Rule | None = None) -> None:
  """Raises `InvalidConfigError` unless `value` satisfies the rule of `section.name`."""
  rule = rule or RULES[section][name]
  field = f'--config.{section}.{name}'
  if value is None:
    if rule.optional:
      return
    raise InvalidConfigError(f'{field} is not set; it must be {rule.describe()}')
  if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
    raise InvalidConfigError(f'{field} must be {rule.describe()}, got {value!r}')
  if not math.isfinite(float(value)):
    raise InvalidConfigError(f'{field} must be {rule.describe()}, got {value}')
  if rule.integer and float(value) != int(value):
    raise InvalidConfigError(f'{field} must be {rule.describe()}, got {value}')
  if not rule.ok(value):
    raise InvalidConfigError(f'{field} must be {rule.describe()}, got {value}')


def validate_config(config) -> None:
  """Checks the numeric fields of every section `config` has; see `RULES`."""
  for section, rules in RULES.items():
    block = config.get(section) if hasattr(config, 'get') else None
    if block is None or not hasattr(block, 'get'):
      continue
    for name, rule in rules.items():
      if name in block:
        check_value(section, name, block.get(name), rule)


def check_finite_batch(tokens, *, what: str = 'sampled batch', cfg=None, temperature=None,
                       source: str = '') -> None:
  """Raises `NonFiniteOutputError` if `tokens` (host array) holds NaN or Inf."""
  arr = np.asarray(tokens)
  if arr.dtype.kind not in 'fc' or arr.size == 0:
    return
  finite = np.isfinite(arr)
  if finite.all():
    return
  bad = int(arr.size - np.count_nonzero(finite))
  rows = int(np.count_nonzero(~finite.reshape(len(arr), -1).all(axis=1))) if arr.ndim else 1
  causes = ['NaN/Inf weights in the model directory'
            + (f' ({source})' if source else '')]
  if cfg is not None:
    causes.append(f'the guidance scale cfg={cfg}')
  if temperature is not None:
    causes.append(f'temperature={temperature}')
  causes.append('a bfloat16 overflow (try --config.model.dtype=float32)')
  raise NonFiniteOutputError(
    f'the {what} holds {bad} non-finite values (NaN/Inf) in {rows} image(s); nothing was '
    f'written for it. Likely causes: {"; ".join(causes)}')
