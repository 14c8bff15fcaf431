"""xAR architecture and official sampling settings (variants B / L / H).

Official: `xAR_DiSA/models/xar.py` factories `xar_base/large/huge` (= OliverRensu/xAR), the xAR
README eval commands and the DiSA README (spec `flowar_xar.md` §1, §6).

| variant | D    | enc + dec | heads (hd) | MLP F | README (no DiSA)  | DiSA README             |
| B       | 768  | 8 + 8     | 12 (64)    | 2048  | 40 steps, cfg 2.7 | 50 -> 15 steps, cfg 2.7 |
| L       | 1024 | 16 + 16   | 16 (64)    | 2730  | 50 steps, cfg 2.3 | 50 -> 15, cfg 2.3       |
| H       | 1280 | 20 + 20   | 16 (80)    | 3413  | 50 steps, cfg 2.2 | 50 -> 15, cfg 2.2       |
Fixed: the 16x16 KL-16 latent grid (16 channels) split into 2x2 cells of 8x8 tokens, generated
in the order top-left, top-right, bottom-left, bottom-right; 1000 classes + null class 1000.
"""

from __future__ import annotations

import dataclasses

from disa_jax.errors import UserError
from disa_jax.layers.mlp import gated_hidden
from disa_jax.systems.common import config as common_config
from disa_jax.systems.common.config import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class XARConfig:
  """Architecture of an xAR model (everything the converter reads off the shapes)."""

  width: int = 768                 # D (encoder = decoder width)
  encoder_depth: int = 8
  decoder_depth: int = 8
  heads: int = 12                  # head dim = width / heads
  token_dim: int = 16              # VAE channels
  class_num: int = 1000
  mlp_ratio: float = 4.0
  grid: int = 16                   # latent side
  cell: int = 8                    # cell side (cells = (grid / cell)^2)

  def __post_init__(self):
    if self.width % self.heads or (self.width // self.heads) % 4:
      raise UserError(f'xAR width {self.width} with {self.heads} heads: the head dim must be an '
                      'integer divisible by 4 (2-D RoPE); change width or heads')
    if self.grid % self.cell:
      raise UserError(f'xAR grid {self.grid} is not a multiple of the cell side {self.cell}')

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def mlp_hidden(self) -> int:
    return gated_hidden(self.width, self.mlp_ratio)

  @property
  def cells_per_side(self) -> int:
    return self.grid // self.cell

  @property
  def num_cells(self) -> int:
    return self.cells_per_side ** 2

  @property
  def cell_tokens(self) -> int:
    return self.cell * self.cell

  @property
  def seq_len(self) -> int:
    return self.grid * self.grid

  @property
  def null_class(self) -> int:
    return self.class_num

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> XARConfig:
    return dataclass_from_dict(cls, d, 'xAR')


VARIANTS = {
  'B': XARConfig(width=768, encoder_depth=8, decoder_depth=8, heads=12),
  'L': XARConfig(width=1024, encoder_depth=16, decoder_depth=16, heads=16),
  'H': XARConfig(width=1280, encoder_depth=20, decoder_depth=20, heads=16),
}
# Unit-test size (the official 16x16 / 8x8 layout, tiny widths).
TINY = XARConfig(width=64, encoder_depth=1, decoder_depth=2, heads=2, class_num=10)
# CPU-sized stand-in with random weights.
CPU = XARConfig(width=128, encoder_depth=2, decoder_depth=2, heads=4)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Official settings: baseline = `baseline_steps` in every cell (xAR README); DiSA = upper ->
  lower over cells (DiSA README)."""

  cfg: float
  baseline_steps: int
  upper: int = 50
  lower: int = 15


OFFICIAL_SAMPLING = {
  'B': SamplingSettings(cfg=2.7, baseline_steps=40),
  'L': SamplingSettings(cfg=2.3, baseline_steps=50),
  'H': SamplingSettings(cfg=2.2, baseline_steps=50),
}


def variant_key(name: str) -> str:
  """'B' / 'L' / 'H' from 'b', 'xAR-L', 'xar_huge', ..."""
  return common_config.variant_key(name, label='xAR', long_names={'BASE': 'B', 'LARGE': 'L', 'HUGE': 'H'},
                                   known=tuple(VARIANTS))


def variant(name: str) -> XARConfig:
  """The official architecture of a variant name."""
  return VARIANTS[variant_key(name)]


def parse_config_arg(arg: str | None) -> dict:
  """'cpu' / 'tiny' / 'tiny,digits' (the text after ':' in --config=configs/xar/...py:cpu)."""
  return common_config.parse_config_arg(arg, 'xAR')


def xar_config(name: str, arg: str | None = None):
  """ml_collections config of xAR-B/L/H (`model`, `sampling`, `runtime`, `tokenizer`)."""
  import ml_collections
  from ml_collections import config_dict

  opts = parse_config_arg(arg)
  key = variant_key(name)
  official = OFFICIAL_SAMPLING[key]
  arch = TINY if opts['tiny'] else CPU if opts['cpu'] else VARIANTS[key]
  if opts['digits']:
    arch = dataclasses.replace(arch, token_dim=1, class_num=10)
  small = opts['cpu'] or opts['tiny']
  c = ml_collections.ConfigDict()
  c.system = 'xar'
  c.name = common_config.config_name('xar', key, opts)
  c.variant = key
  c.model = ml_collections.ConfigDict(arch.to_dict())
  c.checkpoint = ''                 # directory written by `disa-convert xar`
  s = ml_collections.ConfigDict()
  s.variant = key                   # whose README presets `preset` refers to
  s.preset = 'disa'                 # 'disa' (DiSA README 50 -> 15) | 'baseline' (xAR README)
  s.strategy = ''                   # '' = preset; or constant | linear | cosine | two-stage
  s.upper_steps = official.upper
  s.lower_steps = official.lower
  s.baseline_steps = official.baseline_steps
  s.steps = ''                      # explicit per-cell list "50,38,26,15" (overrides)
  s.cfg = official.cfg              # ramped per cell: (cfg - 1) s / 3 + 1
  s.cfg_schedule = 'linear'         # the official per-cell ramp (the only one xAR has)
  s.num_iter = arch.num_cells       # AR stages = cells (fixed by the architecture)
  s.temperature = 1.0               # shared flag; the xAR sampler has no temperature
  s.max_timestep = config_dict.placeholder(int)   # shared flag; unused by flow solvers
  s.num_images = 4 if small else 8
  s.batch_size = 4 if small else 8
  s.classes = ''
  s.seed = 0
  if opts['tiny']:
    s.update(upper_steps=6, lower_steps=3, baseline_steps=5, cfg=2.0)
  c.sampling = s
  # Training (`disa-train`, `systems/xar/train.py`): AdamW betas 0.9 / 0.96 and blr 5e-5 of the
  # xAR README / engine; the rest (wd 0.02, clip 3.0, EMA 0.9999, warmup) is the shared recipe.
  common_config.add_common_sections(c, opts, train_overrides=dict(b2=0.96, blr=5e-5))
  return c


# The bundled digits model (`configs/xar/digits.py`, `disa_jax/assets/digits_xar`): the CPU
# stand-in (width 128, 2 + 2 blocks), 1-channel 16x16 pixel tokens in 4 cells, 10 classes.
DIGITS_ASSET = 'digits_xar'


def digits_config():
  """Config of the bundled xAR digits model (sampling, `disa-demo`, its training recipe)."""
  c = xar_config('B', 'cpu,digits')
  c.name = 'xar_digits'
  common_config.make_bundled_digits(c, DIGITS_ASSET)
  return c
