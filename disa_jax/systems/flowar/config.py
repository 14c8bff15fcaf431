"""FlowAR architecture and official sampling settings (variants S / L / H).

Official: `FlowAR_DiSA/models/flowar.py` factories `flowar_small/large/huge`, the README eval
commands (flow-head sizes `--diffloss_d/--diffloss_w` are not implied by the model name) and
the DiSA README (spec `flowar_xar.md` §1).

| variant | D    | enc + dec | heads (hd) | MLP F | head W x d, block       | README (no DiSA)       | DiSA README          |
| S       | 768  | 6 + 6     | 12 (64)    | 2048  | 1024 x 2,  self-attn    | 25 steps, cfg 4.3, g .9 | 25 -> 15, cfg 4.2, .9 |
| L       | 1024 | 8 + 8     | 16 (64)    | 2730  | 1024 x 12, + cross-attn | 25, cfg 2.4, g .9       | 25 -> 15, 2.4, .9     |
| H       | 1536 | 15 + 15   | 16 (96)    | 4096  | 1536 x 12, + cross-attn | 50, cfg 2.4, g .7       | 50 -> 15, 2.4, .7     |
Fixed: scales 1, 2, 4, 8, 16 (341 tokens), KL-16 latents (16 channels), 1000 classes + null 1000.
"""

from __future__ import annotations

import dataclasses

from disa_jax.errors import UserError
from disa_jax.layers.mlp import gated_hidden
from disa_jax.systems.common import config as common_config
from disa_jax.systems.common.config import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class FlowARConfig:
  """Architecture of a FlowAR model (everything the converter reads off the shapes)."""

  width: int = 768                 # trunk width D (encoder = decoder width)
  encoder_depth: int = 6
  decoder_depth: int = 6
  heads: int = 12                  # trunk heads (head dim = width / heads)
  head_width: int = 1024           # flow head width W (its heads = W / 64)
  head_depth: int = 2
  head_cross: bool = False         # head block v2 (self + cross-attention) for L / H
  scales: tuple[int, ...] = (1, 2, 4, 8, 16)
  token_dim: int = 16              # VAE channels
  class_num: int = 1000
  mlp_ratio: float = 4.0

  def __post_init__(self):
    object.__setattr__(self, 'scales', tuple(int(s) for s in self.scales))
    if self.width % self.heads or (self.width // self.heads) % 4:
      raise UserError(f'FlowAR width {self.width} with {self.heads} heads: the head dim must be '
                      'an integer divisible by 4 (2-D RoPE); change width or heads')
    if self.head_width % 64:
      raise UserError(f'FlowAR head width {self.head_width} must be a multiple of 64 '
                      '(head dim 64); change head_width')

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def head_heads(self) -> int:
    return self.head_width // 64

  @property
  def mlp_hidden(self) -> int:
    return gated_hidden(self.width, self.mlp_ratio)

  @property
  def head_mlp_hidden(self) -> int:
    return gated_hidden(self.head_width, self.mlp_ratio)

  @property
  def seq_len(self) -> int:
    return sum(s * s for s in self.scales)

  @property
  def starts(self) -> tuple[int, ...]:
    out, acc = [], 0
    for s in self.scales:
      out.append(acc)
      acc += s * s
    return tuple(out)

  @property
  def null_class(self) -> int:
    return self.class_num

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['scales'] = list(self.scales)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> FlowARConfig:
    return dataclass_from_dict(cls, d, 'FlowAR')


VARIANTS = {
  'S': FlowARConfig(width=768, encoder_depth=6, decoder_depth=6, heads=12, head_width=1024,
                    head_depth=2, head_cross=False),
  'L': FlowARConfig(width=1024, encoder_depth=8, decoder_depth=8, heads=16, head_width=1024,
                    head_depth=12, head_cross=True),
  'H': FlowARConfig(width=1536, encoder_depth=15, decoder_depth=15, heads=16, head_width=1536,
                    head_depth=12, head_cross=True),
}
# Tiny test shapes (both head block types), used by the tests and the `:tiny` configs.
TINY = {
  'S': FlowARConfig(width=64, encoder_depth=1, decoder_depth=1, heads=2, head_width=64,
                    head_depth=1, head_cross=False, class_num=10),
  'L': FlowARConfig(width=64, encoder_depth=1, decoder_depth=2, heads=2, head_width=128,
                    head_depth=2, head_cross=True, class_num=10),
}


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Official sampling settings: baseline = `upper` steps at every scale; DiSA = upper -> lower."""

  cfg: float
  guidance: float
  upper: int
  lower: int
  disa_cfg: float | None = None    # the DiSA README's cfg where it differs (FlowAR-S: 4.2)


OFFICIAL_SAMPLING = {
  'S': SamplingSettings(cfg=4.3, guidance=0.9, upper=25, lower=15, disa_cfg=4.2),
  'L': SamplingSettings(cfg=2.4, guidance=0.9, upper=25, lower=15),
  'H': SamplingSettings(cfg=2.4, guidance=0.7, upper=50, lower=15),
}


def variant_key(name: str) -> str:
  """'S' / 'L' / 'H' from 's', 'FlowAR-L', 'flowar_huge', ..."""
  return common_config.variant_key(name, label='FlowAR', long_names={'SMALL': 'S', 'LARGE': 'L', 'HUGE': 'H'},
                                   known=tuple(VARIANTS))


def variant(name: str) -> FlowARConfig:
  """The official architecture of a variant name."""
  return VARIANTS[variant_key(name)]


# CPU-sized stand-in: the official 341-token layout with tiny widths (random weights).
CPU = FlowARConfig(width=64, encoder_depth=2, decoder_depth=2, heads=4, head_width=128,
                   head_depth=2, head_cross=False)


def parse_config_arg(arg: str | None) -> dict:
  """'cpu' / 'tiny' / 'tiny,digits' (the text after ':' in --config=configs/flowar/...py:cpu)."""
  return common_config.parse_config_arg(arg, 'FlowAR')


def flowar_config(name: str, arg: str | None = None):
  """ml_collections config of FlowAR-S/L/H (`model`, `sampling`, `runtime`, `tokenizer`)."""
  import ml_collections

  opts = parse_config_arg(arg)
  key = variant_key(name)
  official = OFFICIAL_SAMPLING[key]
  if opts['tiny']:
    arch = TINY['L' if VARIANTS[key].head_cross else 'S']
  elif opts['cpu']:
    arch = dataclasses.replace(CPU, head_cross=VARIANTS[key].head_cross)
  else:
    arch = VARIANTS[key]
  if opts['digits']:
    arch = dataclasses.replace(arch, token_dim=1, class_num=10)
  c = ml_collections.ConfigDict()
  c.system = 'flowar'
  c.name = common_config.config_name('flowar', key, opts)
  c.variant = key
  c.model = ml_collections.ConfigDict(arch.to_dict())
  c.checkpoint = ''                 # directory written by `disa-convert flowar`
  s = ml_collections.ConfigDict()
  s.preset = 'disa'                 # 'disa' (DiSA README upper -> lower) | 'baseline' (official)
  s.strategy = ''                   # '' = preset; or constant | linear | cosine | two-stage
  s.upper_steps = official.upper
  s.lower_steps = official.lower
  s.steps = ''                      # explicit per-scale list "25,22,20,17,15" (overrides)
  s.cfg = official.disa_cfg or official.cfg      # DiSA README cfg (S: 4.2; official S: 4.3)
  s.baseline_cfg = official.cfg
  s.guidance = official.guidance    # guided only while t <= guidance
  s.cfg_schedule = 'linear'         # the official ramp over scales (the only one)
  s.temperature = 1.0               # the Euler ODE has no noise temperature (must stay 1.0)
  s.solver = 'euler'                # flow head ODE solver: 'euler' (official) | 'heun' (2nd order)
  s.num_images = 4 if (opts['cpu'] or opts['tiny']) else 8
  s.batch_size = 4 if (opts['cpu'] or opts['tiny']) else 8
  s.classes = ''
  s.seed = 0
  if opts['tiny']:
    s.update(upper_steps=6, lower_steps=2, cfg=2.0, baseline_cfg=2.0)
  c.sampling = s
  # Training (`disa-train`): the official recipe of main_flowar.py (AdamW 0.9 / 0.95, wd 0.02,
  # blr 1e-4, cosine to 1e-5 after warmup, clip 3.0, EMA 0.9999) and label drop 0.1.
  common_config.add_common_sections(c, opts, train_overrides=dict(lr_schedule='cosine', min_lr=1e-5))
  return c


# The bundled digits model (`configs/flowar/digits.py`, `disa_jax/assets/digits_flowar`): the
# CPU stand-in's trunk with a 64-wide flow head, 1-channel 16x16 pixel tokens, 10 classes.
DIGITS_ASSET = 'digits_flowar'


def digits_config():
  """Config of the bundled FlowAR digits model (sampling, `disa-demo`, its training recipe)."""
  c = flowar_config('S', 'cpu,digits')
  c.name = 'flowar_digits'
  c.model.head_width = 64
  common_config.make_bundled_digits(c, DIGITS_ASSET)
  c.train.num_steps = 1000
  return c
