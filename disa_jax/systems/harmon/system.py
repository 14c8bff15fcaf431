"""Harmon's `System` (see `disa_jax.systems.base`): how the shared commands build, sample,
decode, convert and count FLOPs of a Harmon model (wusize/Harmon + Harmon_DiSA).

Conditions are prompt indices: prompt i of `prompts(config)` (the --prompt flags, or the lines
of --prompts_file), each tokenised with the official template by the user's tokenizer.json
(`disa_jax.tokenizers.text`). Image k gets prompt k mod P. The sampler (`PromptSampler`) maps
indices to token ids and pads every prompt row of a run to one length, so the prompt prefill
compiles once per run. Tokens [B, 32 x 32, 16] at 512 px are decoded with the KL-16 VAE
(`images.decode_images`, Harmon's truncating uint8 conversion). Heavy imports stay in the hooks.
"""

from __future__ import annotations

import functools

import numpy as np

from disa_jax.errors import UserError
from disa_jax.systems.base import System


def model_config(config):
  """The `HarmonConfig` of `config.model`."""
  from disa_jax.systems.harmon.config import HarmonConfig

  return HarmonConfig.from_dict(config.model.to_dict())


def build_model(config, *, seed: int = 0):
  """(model, description): the model directory in `config.checkpoint`, or random weights."""
  from flax import nnx

  from disa_jax.systems.harmon.model import Harmon

  want = model_config(config)
  if config.get('checkpoint'):
    model = load_model(config.checkpoint, expect_config=want)
    return model, f'checkpoint {config.checkpoint}'
  return Harmon(want, rngs=nnx.Rngs(seed)), 'RANDOM WEIGHTS (no checkpoint given)'


def load_model(path, *, expect_config=None, overrides=None):
  """A Harmon model directory; with `expect_config` its architecture must match (the run-time
  image size and dtype are taken from `expect_config`)."""
  import dataclasses

  from disa_jax.systems.harmon.convert import load_harmon

  dtype = (overrides or {}).get('dtype') or (expect_config.dtype if expect_config else None)
  model = load_harmon(path, dtype=dtype)
  if expect_config is not None:
    # the run-time image size and attention splitting are the config's, not the checkpoint's
    mar = dataclasses.replace(model.config.mar, attn_splits=expect_config.mar.attn_splits)
    have = dataclasses.replace(model.config, image_size=expect_config.image_size, mar=mar)
    if have.llm != expect_config.llm or have.mar != expect_config.mar:
      raise UserError(f'{path} holds a different Harmon architecture than the config (LLM '
                      f'{model.config.llm.hidden_size} wide x {model.config.llm.num_hidden_layers}'
                      f', MAR {model.config.mar.encoder_embed_dim} wide); pick the matching '
                      'configs/harmon/*.py')
    if have != model.config:
      model.config = have
  return model


def stage_plan(sampling):
  """Diffusion steps per MAR iteration and the clamp (the MAR schedule options)."""
  from disa_jax.systems.mar.system import stage_plan as mar_stage_plan

  return mar_stage_plan(sampling)


def prompts(config) -> list[str]:
  """The prompts of a run: the lines of `sampling.prompts_file`, else `sampling.prompt` (one
  prompt per line)."""
  from disa_jax.tokenizers.text import read_prompts

  s = config.sampling
  if s.get('prompts_file'):
    return read_prompts(s.prompts_file)
  found = [p.strip() for p in (s.get('prompt') or '').split('\n') if p.strip()]
  if not found:
    raise UserError('no prompt given; pass --prompt="a red apple on a table" (repeatable) or '
                    '--prompts_file=FILE (one prompt per line)')
  return found


@functools.lru_cache(maxsize=4)
def _encode(path: str, texts: tuple[str, ...], cfg_prompt: str, append_period: bool, vocab: int):
  from disa_jax.tokenizers.text import TextTokenizer

  tok = TextTokenizer(path)
  ids = [tok.prompt_ids(t, append_period=append_period) for t in texts]
  uncond = tok.uncond_ids(cfg_prompt)
  top = max(max(r) for r in [*ids, uncond])
  if top >= vocab:
    raise UserError(f'tokenizer {path} gives token id {top}, beyond the model\'s {vocab}-row '
                    'embedding table; pass the tokenizer.json of the matching Qwen2.5 model')
  return ids, uncond


def encoded_prompts(config) -> tuple[list[list[int]], list[int]]:
  """(token ids of each prompt's conditional row, ids of the unconditional CFG row)."""
  texts = tuple(prompts(config))
  path = config.tokenizer.get('text', '')
  if not path:
    raise UserError('no text tokenizer given; pass --tokenizer=PATH/tokenizer.json (the file of '
                    'Qwen/Qwen2.5-*-Instruct or wusize/Harmon-*, downloaded beforehand)')
  s = config.sampling
  return _encode(path, texts, s.cfg_prompt, bool(s.append_period),
                 int(config.model.llm.vocab_size))


class PromptSampler:
  """The engine's sampler contract over `HarmonSampler`: conditions are prompt indices.

  Every prompt row is padded to the longest prompt of the run (rounded up to the prompt
  bucket), so all batches share one prefill shape; image k's randomness is
  fold_in(key, image_ids[k]) whatever its batch.
  """

  def __init__(self, inner, prompt_ids, uncond_ids):
    self.inner = inner
    self.prompt_ids = [list(p) for p in prompt_ids]
    self.uncond_ids = list(uncond_ids)
    self.prompt_len = max(len(r) for r in [*self.prompt_ids, self.uncond_ids])

  @property
  def mesh(self):
    return self.inner.mesh

  @property
  def compile_log(self):
    return self.inner.compile_log

  @property
  def last_stats(self):
    return self.inner.last_stats

  def plan(self, batch_size: int, *, steps, max_timestep=None, cfg: float = 3.0,
           cfg_schedule: str = 'constant'):
    return self.inner.plan(batch_size, steps=steps, max_timestep=max_timestep, cfg=cfg,
                           cfg_schedule=cfg_schedule)

  def compile(self, plan) -> float:
    """Compiles every executable of `plan` (prefill, backbone buckets, head buckets)."""
    return self.inner.compile(plan, prompt_len=self.prompt_len)

  def generate(self, conditions, key, *, steps, image_ids=None, progress=None,
               max_timestep=None, cfg: float = 3.0, cfg_schedule: str = 'constant',
               temperature: float = 1.0, timed: bool = False):
    idx = np.asarray(conditions).astype(int).tolist()
    if any(not 0 <= i < len(self.prompt_ids) for i in idx):
      raise UserError(f'prompt index out of range [0, {len(self.prompt_ids)}): {idx}')
    return self.inner.generate(
      [self.prompt_ids[i] for i in idx], key, uncond_ids=self.uncond_ids, steps=steps,
      max_timestep=max_timestep, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
      image_ids=image_ids, progress=progress, prompt_len=self.prompt_len, timed=timed)


def make_sampler(model, config, mesh):
  from disa_jax.systems.harmon.sampler import HarmonSampler

  rt = config.runtime
  inner = HarmonSampler(model, enc_bucket=rt.enc_bucket, prompt_bucket=rt.prompt_bucket,
                        max_head_waste=rt.max_head_waste,
                        matmul_precision=rt.matmul_precision or None, mesh=mesh)
  ids, uncond = encoded_prompts(config)
  return PromptSampler(inner, ids, uncond)


def conditions(config, num_images: int, *, order: str = 'cycle') -> np.ndarray:
  """Prompt index of every image: cycled (`order='cycle'`), or each prompt repeated
  num_images / P times in a row (`order='blocks'`)."""
  n = len(prompts(config))
  if order == 'blocks':
    if num_images % n:
      raise UserError(f'--num_images ({num_images}) must be a multiple of the {n} prompts')
    return np.arange(n, dtype=np.int32).repeat(num_images // n)
  return (np.arange(num_images) % n).astype(np.int32)


def condition_count(config) -> int:
  return len(prompts(config))


class HarmonDecoder:
  """Token latents [B, L, 16] -> uint8 images [B, 16 g, 16 g, 3] with the KL-16 VAE."""

  def __init__(self, vae, grid: int):
    self.vae, self.grid = vae, grid

  def decode(self, tokens):
    from disa_jax.systems.harmon.images import decode_images

    return decode_images(self.vae, np.asarray(tokens), self.grid)


def make_decoder(config, model):
  tk = config.tokenizer
  if tk.kind == 'kl16' and tk.get('vae'):
    from disa_jax.checkpoint import load_vae

    vae = load_vae(tk.vae, overrides={'dtype': tk.get('dtype', 'float32')})
    return HarmonDecoder(vae, model_config(config).runtime_mar.seq_h)
  return None


def token_preview(model, tokens):
  from disa_jax.tokenizers.image import token_preview as preview

  return preview(model.config.runtime_mar, tokens)


def validate(config) -> None:
  """Harmon checks before any output is touched: iterations, prompts and the tokenizer."""
  seq = model_config(config).runtime_mar.seq_len
  n = config.sampling.num_iter
  if not 1 <= n <= seq:
    raise UserError(f'--num_iter must be in [1, {seq}] for this model ({seq} tokens), got {n}')
  if config.sampling.cfg != 1.0 and not config.sampling.cfg_prompt.strip():
    raise UserError('config.sampling.cfg_prompt is empty; CFG needs the unconditional prompt '
                    "(official: 'Generate an image.')")
  encoded_prompts(config)


def flops(model_cfg, plan, *, official: bool = True) -> dict:
  from disa_jax.systems.harmon.config import HarmonConfig
  from disa_jax.systems.harmon.flops import harmon_flops

  cfg = model_cfg if isinstance(model_cfg, HarmonConfig) else HarmonConfig.from_dict(
    dict(model_cfg))
  return harmon_flops(cfg, plan, official=official)


SYSTEM = System(
  name='harmon',
  build_model=build_model,
  load_model=load_model,
  stage_plan=stage_plan,
  make_sampler=make_sampler,
  conditions=conditions,
  condition_count=condition_count,
  make_decoder=make_decoder,
  token_preview=token_preview,
  validate=validate,
  converter='disa_jax.systems.harmon.convert',
  flops=flops,
  flag_names=('prompt', 'prompts_file', 'tokenizer'),
  condition_text=prompts,
)
