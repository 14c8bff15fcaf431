"""Text prompts for Harmon: the official prompt template, tokenised with the `tokenizers`
library from a Qwen2.5 `tokenizer.json` the user supplies by path (no download, no transformers).

Strings (wusize/Harmon configs' INSTRUCTION and scripts/text2image.py; shared/spec/harmon.md §2.1):
  template       '<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n'
                 (no system turn, no leading newline: NOT the tokenizer's own chat template,
                 which inserts a default system turn)
  conditional    'Generate an image: {prompt}'   (batch_text2image.py: prompt.strip() + '.')
  unconditional  'Generate an image.'            (the CFG rows)
Encoding: special tokens inside the string (`<|im_start|>`, `<|im_end|>`) are single ids, no BOS
or EOS is added (Qwen2's tokenizer.json has no post-processor). For the real Qwen2.5 file the
default prompt gives 24 ids and the unconditional one 12 (spec §2.1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from disa_jax.errors import UserError

PROMPT_TEMPLATE = '<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n'
COND_FORMAT = 'Generate an image: {prompt}'
UNCOND_TEXT = 'Generate an image.'
SPECIAL_TOKENS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')


class TokenizerError(UserError):
  """The tokenizer file is missing or unusable; the message says what to pass instead."""


def harmon_text(prompt: str, *, append_period: bool = False) -> str:
  """The full conditional prompt string for `prompt` (official template)."""
  body = COND_FORMAT.format(prompt=prompt.strip() + '.' if append_period else prompt)
  return PROMPT_TEMPLATE.format(input=body)


def uncond_text(cfg_prompt: str = UNCOND_TEXT) -> str:
  return PROMPT_TEMPLATE.format(input=cfg_prompt)


class TextTokenizer:
  """A Qwen2 byte-level BPE tokenizer loaded from `tokenizer.json` (the `tokenizers` library)."""

  def __init__(self, path: str | os.PathLike):
    path = os.path.expanduser(os.fspath(path))
    if not path:
      raise TokenizerError('no text tokenizer given; pass --tokenizer=PATH/tokenizer.json (the '
                           'file of Qwen/Qwen2.5-*-Instruct or wusize/Harmon-*)')
    if os.path.isdir(path):
      cand = os.path.join(path, 'tokenizer.json')
      if not os.path.exists(cand):
        raise TokenizerError(f'{path} is a directory without tokenizer.json; pass the file')
      path = cand
    if not os.path.exists(path):
      raise TokenizerError(f'tokenizer file {path} does not exist; pass the tokenizer.json of '
                           'Qwen/Qwen2.5-*-Instruct (or wusize/Harmon-*), downloaded beforehand')
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise TokenizerError('the `tokenizers` package is missing; pip install tokenizers==0.20.3'
                           ) from None
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for malformed JSON
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise TokenizerError(f'{path} is not a tokenizers tokenizer.json ({first})') from None
    self.path = path
    missing = [t for t in SPECIAL_TOKENS[1:] if self._tok.token_to_id(t) is None]
    if missing:
      raise TokenizerError(f'{path} lacks the chat tokens {missing}: not a Qwen2 tokenizer')

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=True).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def eos_id(self) -> int:
    """`<|im_end|>` (the official right-padding id of text2image.py)."""
    return self._tok.token_to_id('<|im_end|>')

  def prompt_ids(self, prompt: str, *, append_period: bool = False) -> list[int]:
    """Ids of the conditional prompt row."""
    return self.encode(harmon_text(prompt, append_period=append_period))

  def uncond_ids(self, cfg_prompt: str = UNCOND_TEXT) -> list[int]:
    """Ids of the unconditional (CFG) prompt row."""
    return self.encode(uncond_text(cfg_prompt))


def load_text_tokenizer(path: str | os.PathLike) -> TextTokenizer:
  return TextTokenizer(path)


def read_prompts(path: str | os.PathLike) -> list[str]:
  """Prompts from a text file, one per line (blank lines skipped)."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise UserError(f'prompts file {path} does not exist')
  with open(path, encoding='utf-8') as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise UserError(f'prompts file {path} has no prompts (one per line)')
  return prompts
