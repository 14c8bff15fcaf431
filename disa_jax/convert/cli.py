"""disa-convert: official PyTorch weights -> disa_jax model directories (run once, offline).

  disa-convert mar --torch-checkpoint checkpoint-last.pth --out ckpt/mar_base [--weights ema]
  disa-convert vae --torch-checkpoint kl16.ckpt --out ckpt/kl16
  disa-convert flowar --torch-checkpoint FlowAR-S.pth --out ckpt/flowar_s
  disa-convert inception --torch-checkpoint pt_inception-2015-12-05-6726825d.pth --out ckpt/inc

Each KIND is a module `disa_jax.systems.<kind>.convert` (a system) or `disa_jax.convert.<kind>`
(a shared model) exposing
`convert(torch_checkpoint, out, *, weights, variant, overwrite) -> pathlib.Path` (KIND
`SYSTEM-PART`, e.g. dar-tokenizer: that module's `convert_PART`), which
validates strictly and writes atomically. Errors are one line (exit status 2); nothing is
written on failure.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

KINDS = {
  'mar': 'MAR-B/L/H checkpoint-last.pth (model / model_ema) or mar-*.safetensors',
  'flowar': 'FlowAR-S/L/H FlowAR-*.pth (flat state dict, or model_ema / model) or .safetensors',
  'vae': 'KL-16 VAE kl16.ckpt / kl16.safetensors',
  'inception': 'FID Inception-v3 pt_inception-2015-12-05-6726825d.pth',
  'xar': 'xAR-B/L/H.pth (flat state dict, official) or .safetensors',
  'dar': 'D-AR GPT D-AR-L-360K.pt / D-AR-XL-360K.pt',
  'dar-tokenizer': 'D-AR tokenizer D-AR-tokenizer_v1.pt',
}


def _define_flags():
  from disa_jax.cli import flags as cli_flags

  cli_flags.define_out()
  if 'torch_checkpoint' in FLAGS:
    return
  flags.DEFINE_string('torch_checkpoint', None, 'The PyTorch (.pth/.ckpt, loaded with '
                      'weights_only=True) or .safetensors file.')
  flags.DEFINE_enum('weights', 'ema', ['ema', 'raw'], 'MAR: which weights of a training '
                    'checkpoint (ema = model_ema).')
  flags.DEFINE_enum('variant', None, ['base', 'large', 'huge'], 'MAR: variant (heads, head '
                    'depth/width); inferred from shapes if omitted.')
  flags.DEFINE_integer('num_heads', None, 'MAR: attention heads, only for a non-official width '
                       '(official widths imply them).', lower_bound=1)


FLAGS = flags.FLAGS
_define_flags()


def converter_module(kind: str):
  """`disa_jax.systems.<kind>.convert` (a system's weights) or `disa_jax.convert.<kind>`
  (shared models: the VAE, Inception), or None."""
  for name in (f'disa_jax.systems.{kind}.convert', f'disa_jax.convert.{kind}'):
    try:
      return importlib.import_module(name)
    except ModuleNotFoundError as e:
      if not name.startswith(e.name or '<none>'):
        raise
  return None


def main(argv=None) -> int:
  """`disa-convert KIND --torch-checkpoint FILE --out DIR ...`; returns the exit status."""
  from disa_jax.cli.common import _print_error, help_text, normalize_argv
  from disa_jax.errors import UserError

  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ('--help', '-h', '--helpshort') for a in argv):
    print(help_text(__doc__))
    return 0
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(['disa-convert', *normalize_argv(argv)])[1:]
  except flags.Error as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    return 2
  try:
    if len(rest) != 1:
      raise UserError('name what the checkpoint holds: disa-convert '
                      f'{{{",".join(sorted(KINDS))}}} --torch-checkpoint FILE --out DIR')
    kind = rest[0]
    if not FLAGS.torch_checkpoint or not FLAGS.out:
      raise UserError('--torch-checkpoint FILE and --out DIR are required')
    if FLAGS.num_heads is not None and kind != 'mar':
      raise UserError(f'--num-heads applies to `disa-convert mar` only, not {kind}')
    base, _, part = kind.partition('-')    # SYSTEM-PART: convert_PART of the system's module
    module = converter_module(base) if base.isidentifier() else None
    fn = getattr(module, f'convert_{part}' if part else 'convert', None) if module else None
    if fn is None:
      raise UserError(f'converting {kind} checkpoints is not available in this version; '
                      f'choose one of {", ".join(sorted(KINDS))}')
    extra = {'num_heads': FLAGS.num_heads} if FLAGS.num_heads is not None else {}
    out = fn(FLAGS.torch_checkpoint, FLAGS.out, weights=FLAGS.weights,
                         variant=FLAGS.variant, overwrite=FLAGS.overwrite, **extra)
  except UserError as e:
    _print_error(e)
    return 2
  except OSError as e:     # disk full, permission denied, ...: one line naming the path
    from disa_jax.integrity import write_error

    err = write_error(e)
    if err is None:
      raise
    print(f'error: {err}', file=sys.stderr)
    return 2
  except Exception as e:   # module errors that are not UserError subclasses yet
    from disa_jax.convert.torch_io import CheckpointReadError

    if isinstance(e, CheckpointReadError | FileNotFoundError):
      _print_error(e)
      return 2
    raise
  print(f'wrote {out}')
  return 0


def run():
  sys.exit(main())


if __name__ == '__main__':
  run()
