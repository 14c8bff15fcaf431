"""D-AR's own command-line flags (`SYSTEM.flag_names`), defined once per process by
`disa_jax.cli.flags.define_system_flags`; every default is None = keep the config's value.

  --previews                  write previews/NNNNNN.png: the streaming preview after every group
                              (one decoder step each), left to right, per image
  --layout_from=IMAGE         encode IMAGE and keep its first --prefix_groups groups of ids as
                              the prefix of every sample (zero-shot layout control)
  --prefix_groups=k           groups of ids in the prefix (1..groups-1)
  --prefix_from_sample        take the prefix from the run's image 0 (its first k groups)
  --num_tokens=n              knob: stop after n ids; the image is the last group's preview
  --decoder_steps=S           knob: coarser decoder grid (S < groups steps)
  --top_k, --top_p            sampling filters (0 / 1.0 = off, the official setting)
  --draft=DIR|random:SIZE     speculative decoding with this draft GPT (distribution kept)
  --draft_tokens=K            ids drafted per round (default 4)
  --speculate_from=j          first id drafted (default: the second half)
  --tokenizer_checkpoint=DIR  tokenizer model directory (`disa-convert dar-tokenizer`)
"""

from __future__ import annotations

from absl import flags

FLAGS = flags.FLAGS


def _define(define, name, help_text, **kw):
  """Defines a flag unless another system's flags module already did (same meaning)."""
  if name not in FLAGS:
    define(name, None, help_text, **kw)


_define(flags.DEFINE_bool, 'previews', 'D-AR: write a strip of the streaming previews (one per '
        'group) per image into previews/.')
_define(flags.DEFINE_string, 'layout_from', 'D-AR: reference image whose first --prefix_groups '
        'groups of ids prefix every sample (layout control).')
_define(flags.DEFINE_integer, 'prefix_groups', 'D-AR: groups of ids in the layout prefix.',
        lower_bound=0)
_define(flags.DEFINE_bool, 'prefix_from_sample', 'D-AR: share the first --prefix_groups groups '
        'of image 0 across every image.')
_define(flags.DEFINE_integer, 'num_tokens', 'D-AR knob: stop after this many ids (early stop '
        'with preview; 0 = all).', lower_bound=0)
_define(flags.DEFINE_integer, 'decoder_steps', 'D-AR knob: coarser decoder grid of this many '
        'steps (0 = the official one step per group).', lower_bound=0)
_define(flags.DEFINE_integer, 'top_k', 'top-k filter (0 = off).', lower_bound=0)
_define(flags.DEFINE_float, 'top_p', 'top-p filter in (0, 1] (1.0 = off).')
_define(flags.DEFINE_string, 'draft', 'D-AR: speculative decoding with this draft GPT (a '
        'converted D-AR GPT directory, or random:SIZE for benchmarks).')
_define(flags.DEFINE_integer, 'draft_tokens', 'D-AR: ids drafted per speculative round.',
        lower_bound=1)
_define(flags.DEFINE_integer, 'speculate_from', 'D-AR: first id generated speculatively '
        '(0 = the second half).', lower_bound=0)
_define(flags.DEFINE_string, 'tokenizer_checkpoint', 'D-AR: tokenizer model directory '
        '(disa-convert dar-tokenizer).')

SAMPLING = ('previews', 'layout_from', 'prefix_groups', 'prefix_from_sample', 'num_tokens',
            'decoder_steps', 'top_k', 'top_p', 'draft', 'draft_tokens', 'speculate_from')


def apply(config):
  """Copies the D-AR flags that were given into `config` (unlocked by the caller)."""
  for name in SAMPLING:
    if name in FLAGS and getattr(FLAGS, name) is not None:
      config.sampling[name] = getattr(FLAGS, name)
  if 'tokenizer_checkpoint' in FLAGS and FLAGS.tokenizer_checkpoint is not None:
    config.tokenizer_checkpoint = FLAGS.tokenizer_checkpoint
  return config
