"""Harmon's own command-line flags (`System.flag_names`), defined by the sampling commands
before parsing (`disa_jax.cli.flags.define_system_flags`) and applied to the config after it:

  --prompt="a red apple"  (repeatable: one image prompt per flag, cycled over the images)
  --prompts_file=FILE     one prompt per line (replaces --prompt)
  --tokenizer=FILE        a Qwen2.5 tokenizer.json (or its directory); no download

They land in `config.sampling.prompt` (several prompts joined by newlines),
`config.sampling.prompts_file` and `config.tokenizer.text`, so `--config.*` overrides and
these flags are one thing and `System.validate` checks them either way.
"""

from __future__ import annotations

from absl import flags

FLAG_NAMES = ('prompt', 'prompts_file', 'tokenizer')


def define() -> None:
  if 'prompt' in flags.FLAGS:
    return
  flags.DEFINE_multi_string('prompt', None, 'Text prompt (Harmon); repeat the flag for several '
                            'prompts, cycled over the images.')
  flags.DEFINE_string('prompts_file', None, 'Text file with one prompt per line (Harmon).')
  flags.DEFINE_string('tokenizer', None, 'Qwen2.5 tokenizer.json (Harmon; no download).')


def apply(config) -> None:
  """Copies the flags that were given into `config` (unlocked by the caller)."""
  f = flags.FLAGS
  if 'prompt' not in f:
    return
  if f.prompt:
    bad = [p for p in f.prompt if '\n' in p or not p.strip()]
    if bad:
      from disa_jax.errors import UserError

      raise UserError(f'--prompt must be one non-empty line, got {bad[0]!r}; put several '
                      'prompts in repeated --prompt flags or a --prompts_file')
    config.sampling.prompt = '\n'.join(p.strip() for p in f.prompt)
  if f.prompts_file is not None:
    config.sampling.prompts_file = f.prompts_file
  if f.tokenizer is not None:
    config.tokenizer.text = f.tokenizer
