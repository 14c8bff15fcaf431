"""disa-bench: baseline(s) and DiSA side by side, in one process, on one model and batch.

Every system brings its own comparison as its `bench_command` (`disa_jax.systems.base.
find_command`); most run it through `cli/bench_run.run_bench` (MAR, FlowAR, Harmon; D-AR has its own
body). MAR (`systems/mar/bench.py`):

  disa-bench --config=configs/mar_base.py --batch-size=4 --json
  disa-bench --config=configs/mar_base.py:cpu --runs=mar64=mar:64:100,disa64=disa:64:50:5 \\
      --torch --phases --dtypes=float32,bfloat16

Each run is `label=preset:num_iter:upper[:lower[:strategy]]`; the first run is the baseline
for speedups. Compilation happens before the timed repeats and is reported (total and per
bucket). Per run: sampling wall time, images/s, head token-steps per image, compilations,
padding waste, counted TFLOP per image (official algorithm and what runs here), achieved
TFLOP/s and its fraction of a matmul peak measured in the same process, the measured speedup
and the one predicted from counted FLOPs (and, with `--phases` or `--calibrate`, from a FLOP
model calibrated on the baseline's backbone / head split). `--phases` adds a synchronised pass splitting time
into backbone / head (/ VAE decode with --vae); `--torch` times the PyTorch reference
(`reference.mar`: same weights, batch and schedule); `--dtypes` repeats
everything per compute dtype and reports bfloat16's error against float32.

Harmon configs (configs/harmon/*.py) run Harmon's own comparison
(`disa_jax.systems.harmon.bench.disa_bench`): the baseline (100 steps) and DiSA 100 -> 5,
50 -> 5, 25 -> 5 side by side, time split MAR encoder / LLM / MAR decoder / head:
  disa-bench --config=configs/harmon/0_5b.py:cpu --batch-size=2 --config.sampling.num_iter=16
"""

from __future__ import annotations

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

_CONFIG = cli_flags.define_config()
cli_flags.define_model()
cli_flags.define_system_flags()
cli_flags.define_batch()        # --batch_size (default 4 here), --seed (default 0 here)
cli_flags.define_guidance()     # --cfg, --cfg_schedule, --temperature (default: the config's)
cli_flags.define_runs()
flags.DEFINE_integer('repeats', 1, 'Timed repeats per run (the minimum is reported).')
flags.DEFINE_bool('phases', False, 'Extra synchronised pass timing backbone, head (, decode).')
flags.DEFINE_bool('calibrate', False, 'Phase pass on the baseline only, for the calibrated FLOP '
                  'prediction (implied by --phases).')
flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference on the same weights.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: leave the default).')
flags.DEFINE_string('dtypes', None, 'Compute dtypes to run, e.g. float32,bfloat16 '
                    '(default: the config\'s).')
flags.DEFINE_string('quality', None, 'Quality metric for each run\'s images (e.g. digits).')
flags.DEFINE_bool('json', False, 'Print the result as JSON only.')
flags.DEFINE_string('json_out', None, 'Also write the JSON result to this file.')

FLAGS = flags.FLAGS

def _run(argv):
  del argv
  cli_flags.run_command(common.config_value(_CONFIG), 'bench', name='disa-bench')


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
