"""disa-train: train (or resume) a MAR model; optionally export its weights for sampling.

  disa-train --config=configs/digits.py --workdir=runs/digits --export=models/digits
  disa-train --config=configs/mar_base.py --workdir=gs://bucket/mar_b \\
      --config.data.cache_dir=/data/in1k_kl16 --config.train.fsdp=4
  disa-train --config=configs/digits.py --workdir=runs/digits --export=DIR --export-only

The run resumes from the newest checkpoint in --workdir (restart the same command after an
interruption). --export writes the EMA weights (or --export-weights=raw) of the final step
as a model directory for `disa-sample --checkpoint=DIR` / `disa_jax.load_mar(DIR)`.
"""

from __future__ import annotations

import os

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config(
  'Config file, e.g. configs/mar/digits.py or configs/mar/base.py:cpu.')
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, config.json.')
flags.DEFINE_string('export', None, 'Write the final weights as a model directory here.')
flags.DEFINE_enum('export_weights', 'ema', ['ema', 'raw'], 'Which weights to export.')
flags.DEFINE_bool('overwrite_export', False, 'Replace an existing --export directory.')
flags.DEFINE_bool('export_only', False, 'Export the newest checkpoint without training.')
flags.DEFINE_integer('stop_at', None, 'End this invocation after this many updates '
                     '(the run can be resumed later).')

FLAGS = flags.FLAGS


def train_command(config):
  """The shared disa-train body: `train/loop.train` (a system plugs in through its `train_step`
  module), or `--export-only`."""
  common.check_config(config)
  if not FLAGS.workdir:
    raise common.CliError('--workdir is required (the run directory; an existing one resumes)')
  if 'train' not in config or 'data' not in config:
    raise common.CliError('this config has no train/data section; use configs/digits.py or a '
                          'configs/mar_*.py file')
  if FLAGS.export and os.path.exists(FLAGS.export) and not FLAGS.overwrite_export:
    raise common.CliError(f'export directory {FLAGS.export} already exists; pass '
                          '--overwrite-export or choose another --export')
  from disa_jax.data.records import CacheError
  from disa_jax.train import loop

  try:
    if FLAGS.export_only:
      if not FLAGS.export:
        raise common.CliError('--export-only needs --export=DIR')
      state, step = loop.restore_state(FLAGS.workdir, config)
      out = loop.export_model(FLAGS.export, state, config, weights=FLAGS.export_weights,
                              step=step, overwrite=FLAGS.overwrite_export)
      print(f'exported the {FLAGS.export_weights} weights of step {step} to {out}')
      return
    loop.train(config, FLAGS.workdir, stop_at=FLAGS.stop_at, export=FLAGS.export,
               export_weights=FLAGS.export_weights, overwrite_export=FLAGS.overwrite_export,
               print_fn=lambda s: print(s, flush=True))
  except (loop.TrainingError, CacheError) as e:
    raise common.CliError(str(e)) from None


def _run(argv):
  del argv
  cli_flags.run_command(common.config_value(_CONFIG), 'train', train_command, name='disa-train')


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
