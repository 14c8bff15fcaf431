"""disa-convert: official PyTorch weights -> disa_jax model directories (run once, offline).

  disa-convert mar --torch-checkpoint checkpoint-last.pth --out ckpt/mar_base [--weights ema]
  disa-convert vae --torch-checkpoint kl16.ckpt --out ckpt/kl16
  disa-convert inception --torch-checkpoint pt_inception-2015-12-05-6726825d.pth --out ckpt/inc

Each KIND is a module `disa_jax.convert.<kind>` exposing
`convert(torch_checkpoint, out, *, weights, variant, overwrite) -> pathlib.Path`, which
validates strictly and writes atomically. Errors are one line (exit status 2); nothing is
written on failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

KINDS = {
  'mar': 'MAR-B/L/H checkpoint-last.pth (model / model_ema) or mar-*.safetensors',
  'vae': 'KL-16 VAE kl16.ckpt / kl16.safetensors',
  'inception': 'FID Inception-v3 pt_inception-2015-12-05-6726825d.pth',
}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='disa-convert', description='Convert official PyTorch weights to disa_jax (orbax).')
  p.add_argument('kind', choices=sorted(KINDS), help='what the checkpoint holds: ' +
                 '; '.join(f'{k}: {v}' for k, v in KINDS.items()))
  p.add_argument('--torch-checkpoint', '--torch_checkpoint', required=True, dest='checkpoint',
                 help='the PyTorch (.pth/.ckpt, loaded with weights_only=True) or .safetensors '
                      'file')
  p.add_argument('--out', required=True, help='output model directory (must not exist)')
  p.add_argument('--weights', choices=['ema', 'raw'], default='ema',
                 help='MAR: which weights of a training checkpoint (default ema = model_ema)')
  p.add_argument('--variant', choices=['base', 'large', 'huge'], default=None,
                 help='MAR: variant (heads, head depth/width); inferred from shapes if omitted')
  p.add_argument('--num-heads', '--num_heads', type=int, default=None, dest='num_heads',
                 help='MAR: attention heads, only for a non-official width (official widths '
                      'imply them)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  return p


def main(argv=None) -> int:
  from disa_jax.checkpoint import CheckpointError
  from disa_jax.convert.mapping import ConversionError
  from disa_jax.convert.torch_io import CheckpointReadError
  from disa_jax.errors import UserError

  args = build_parser().parse_args(argv)
  if args.num_heads is not None and args.kind != 'mar':
    print(f'error: --num-heads applies to `disa-convert mar` only, not {args.kind}',
          file=sys.stderr)
    return 2
  try:
    module = importlib.import_module(f'disa_jax.convert.{args.kind}')
  except ModuleNotFoundError:
    print(f'error: converting {args.kind} checkpoints is not available in this version',
          file=sys.stderr)
    return 2
  try:
    extra = {'num_heads': args.num_heads} if args.num_heads is not None else {}
    out = module.convert(args.checkpoint, args.out, weights=args.weights, variant=args.variant,
                         overwrite=args.overwrite, **extra)
  except OSError as e:   # disk full, permission denied, ...: one line naming the path
    from disa_jax.integrity import write_error

    err = write_error(e)
    if err is None:
      raise
    print(f'error: {err}', file=sys.stderr)
    return 2
  except (CheckpointError, ConversionError, CheckpointReadError, UserError) as e:
    first, *rest = str(e).strip().splitlines() or [e.__class__.__name__]
    print(f'error: {first}', file=sys.stderr)
    for line in rest:
      print(f'  {line.strip()}', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


def run():
  sys.exit(main())


if __name__ == '__main__':
  run()
