"""Harmon variants and fixed settings (shared/spec/harmon.md §1, §2.4).

  Harmon-0.5B = Qwen2.5-0.5B-Instruct trunk + MAR-B (D 768, 12+12 blocks, head 6 x 1024)
  Harmon-1.5B = Qwen2.5-1.5B-Instruct trunk + MAR-H (D 1280, 20+20 blocks, head 12 x 1536)

The MAR parameter shapes are those of an img_size-256 MAR (16 x 16 grid, 64 buffer slots); the
run-time image size is 512 (32 x 32 = 1024 tokens), reached by resizing the position embeddings
(`disa_jax.systems.harmon.model.at_image_size`). The class embedding exists but is unused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from disa_jax.layers.qwen2 import QWEN2_5_0_5B, QWEN2_5_1_5B, Qwen2Config
from disa_jax.systems.mar.model import MARConfig

VAE_SCALE = 0.2325
DEFAULT_IMAGE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class HarmonConfig:
  """Architecture: the Qwen2 trunk, the MAR (parameter shapes) and the run-time image size."""

  llm: Qwen2Config = QWEN2_5_0_5B
  mar: MARConfig = dataclasses.field(default_factory=MARConfig)
  image_size: int = DEFAULT_IMAGE_SIZE

  def __post_init__(self):
    if self.image_size % self.mar.vae_stride:
      raise ValueError(f'image_size {self.image_size} must be a multiple of the VAE stride '
                       f'{self.mar.vae_stride}')
    if self.llm.dtype != self.mar.dtype:
      raise ValueError(f'llm dtype {self.llm.dtype} != mar dtype {self.mar.dtype}')

  @property
  def runtime_mar(self) -> MARConfig:
    """The MAR config at the run-time image size (what the sampler's shapes follow)."""
    return dataclasses.replace(self.mar, img_size=self.image_size)

  @property
  def dtype(self) -> str:
    return self.llm.dtype

  def with_dtype(self, dtype: str) -> HarmonConfig:
    return dataclasses.replace(self, llm=dataclasses.replace(self.llm, dtype=dtype),
                               mar=dataclasses.replace(self.mar, dtype=dtype))

  def to_dict(self) -> dict:
    return {'llm': self.llm.to_dict(), 'mar': self.mar.to_dict(), 'image_size': self.image_size}

  @classmethod
  def from_dict(cls, d: Any) -> HarmonConfig:
    d = dict(d)
    unknown = sorted(set(d) - {'llm', 'mar', 'image_size'})
    if unknown:
      raise ValueError(f'unknown Harmon config keys {unknown}; known: image_size, llm, mar')
    return cls(llm=Qwen2Config.from_dict(d.get('llm', {})),
               mar=MARConfig.from_dict(d.get('mar', {})),
               image_size=int(d.get('image_size', DEFAULT_IMAGE_SIZE)))


_MAR_B = MARConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                   decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                   diffloss_d=6, diffloss_w=1024)
_MAR_H = MARConfig(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                   decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                   diffloss_d=12, diffloss_w=1536)

VARIANTS: dict[str, HarmonConfig] = {
  'harmon_0_5b': HarmonConfig(llm=QWEN2_5_0_5B, mar=_MAR_B),
  'harmon_1_5b': HarmonConfig(llm=QWEN2_5_1_5B, mar=_MAR_H),
}


def tiny_config(dtype: str = 'float32') -> HarmonConfig:
  """A few-layer Harmon with the real head geometry of Qwen2.5-0.5B (14 heads, 2 KV heads) and a
  4 x 4-token MAR run at an 8 x 8 grid (so the pos-embed resizing runs): tests and smoke runs."""
  llm = Qwen2Config(vocab_size=512, hidden_size=112, intermediate_size=224, num_hidden_layers=2,
                    num_attention_heads=14, num_key_value_heads=2, dtype=dtype)
  mar = MARConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                  decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, diffloss_d=2,
                  diffloss_w=64, img_size=64, buffer_size=8, class_num=10, dtype=dtype,
                  attn_splits=1)
  return HarmonConfig(llm=llm, mar=mar, image_size=128)


# Sampling defaults of the official scripts (scripts/text2image.py): 64 AR iterations,
# constant CFG 3.0, temperature 1.0, 100 diffusion steps (no clamp); DiSA presets U -> 5 linear
# with the 950 clamp (Harmon_DiSA configs).
SAMPLING_DEFAULTS = dict(num_iter=64, cfg=3.0, cfg_schedule='constant', temperature=1.0,
                         steps=100, max_timestep=None)
DISA_PRESETS = {'disa_100_5': (100, 5), 'disa_50_5': (50, 5), 'disa_25_5': (25, 5)}


def cpu_config(variant: str, dtype: str = 'float32') -> HarmonConfig:
  """A CPU-sized stand-in of `variant`: the real Qwen2 head geometry (heads, KV heads, head dim),
  4 LLM layers, MAR with 4 + 4 blocks and a 3-block head, run at 256 px (16 x 16 tokens)."""
  full = VARIANTS[variant]
  llm = dataclasses.replace(full.llm, num_hidden_layers=4, vocab_size=151936, dtype=dtype)
  mar = dataclasses.replace(full.mar, encoder_depth=4, decoder_depth=4, diffloss_d=3,
                            dtype=dtype)
  return HarmonConfig(llm=llm, mar=mar, image_size=256)


def harmon_config(variant: str, *, cpu: bool = False, tiny: bool = False):
  """The ml_collections config of `configs/harmon/*.py` (`config.system = 'harmon'`)."""
  import ml_collections

  from disa_jax.config import runtime_config, sampling_config, tokenizer_config

  if variant not in VARIANTS:
    raise ValueError(f'unknown Harmon variant {variant!r}; choose one of {sorted(VARIANTS)}')
  arch = tiny_config() if tiny else cpu_config(variant) if cpu else VARIANTS[variant]
  c = ml_collections.ConfigDict()
  c.system = 'harmon'
  c.name = variant + ('-tiny' if tiny else '-cpu' if cpu else '')
  c.model = ml_collections.ConfigDict(arch.to_dict())
  c.checkpoint = ''              # directory written by `disa-convert harmon`
  # Image decoder: KL-16 VAE directory (`disa-convert vae`; kl16.ckpt, --vae) and the text
  # tokenizer: a Qwen2.5 tokenizer.json (--tokenizer; no download). The CPU / tiny stand-ins
  # write tokens and a latent preview unless --vae is given.
  c.tokenizer = tokenizer_config(kind='none' if (cpu or tiny) else 'kl16', scale=VAE_SCALE)
  c.tokenizer.text = ''
  # Official scripts/text2image.py defaults: 64 iterations, constant CFG 3.0, temperature 1,
  # 100 diffusion steps at every iteration without the clamp ('mar' preset = Harmon baseline);
  # --preset=disa --upper-steps=50 gives DiSA 50 -> 5 (clamp 950).
  c.sampling = sampling_config(preset='mar', upper_steps=100, lower_steps=5, num_iter=64,
                               cfg=3.0, cfg_schedule='constant', temperature=1.0,
                               num_images=4, batch_size=4)
  c.sampling.prompt = ''         # --prompt (repeatable: several prompts joined by newlines)
  c.sampling.prompts_file = ''   # --prompts_file: one prompt per line (replaces `prompt`)
  c.sampling.cfg_prompt = UNCOND_TEXT
  c.sampling.append_period = False   # batch_text2image.py appends '.' to each prompt
  if cpu or tiny:
    c.sampling.update(num_images=2, batch_size=2)
  if tiny:
    c.sampling.update(num_iter=4, upper_steps=10, lower_steps=3)
  c.runtime = runtime_config(enc_bucket=0)
  c.runtime.prompt_bucket = 16
  c.runtime.fsdp = 1             # > 1: mesh (data, fsdp), parameters FSDP-sharded over `fsdp`
  c.lock()
  return c


UNCOND_TEXT = 'Generate an image.'
