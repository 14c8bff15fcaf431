"""The shared adapter behind most systems' `disa-bench` body (`bench_command`).

A system's comparison is a function `disa_bench(config, *, batch_size, seed, log, ...) -> dict`
with a `format_table(result) -> str` (MAR: `systems/mar/bench.py`; FlowAR, Harmon: their
`bench.py`); `run_bench` applies the model flags, passes the generic disa-bench flags the user
gave by keyword, and reports (JSON or table, --json-out). It reads the flags that
`disa_jax.cli.bench` defines; it is its own module so that `python -m disa_jax.cli.bench`
(the command run as __main__) and the systems' command modules share one copy.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS

DEFAULT_BATCH_SIZE = 4


def run_bench(config, disa_bench, format_table) -> dict:
  """The shared adapter behind most systems' `bench_command`: applies the model flags, passes
  the generic flags the user gave to `disa_bench(config, *, batch_size, seed, log, ...)` by
  keyword (`--torch` as `with_torch`; a given flag the function does not take is a one-line
  error), and prints the result as a table (`format_table(result)`) or JSON."""
  import inspect

  from disa_jax.systems.base import system_name

  common.check_config(config)
  with config.unlocked():
    if FLAGS.checkpoint:
      config.checkpoint = FLAGS.checkpoint
    if FLAGS.vae:
      config.tokenizer.vae = FLAGS.vae
    if FLAGS.temperature is not None:
      config.sampling.temperature = FLAGS.temperature
    if 'cache' in FLAGS and FLAGS.cache is not None:
      config.sampling.cache = FLAGS.cache
  cli_flags.check_cache(config)
  batch_size = DEFAULT_BATCH_SIZE if FLAGS.batch_size is None else FLAGS.batch_size
  seed = 0 if FLAGS.seed is None else FLAGS.seed
  if batch_size < 1 or FLAGS.repeats < 1:
    raise common.CliError('--batch_size and --repeats must be >= 1')
  params = inspect.signature(disa_bench).parameters
  kwargs = {'batch_size': batch_size, 'seed': seed}
  for flag, kw in BENCH_FLAGS.items():
    if FLAGS[flag].present:
      if kw not in params:
        raise common.CliError(f'--{flag} is not available for {system_name(config)} in '
                              'disa-bench; drop it')
      kwargs[kw] = FLAGS[flag].value
  result = disa_bench(config, log=logger(), **kwargs)
  report(result, lambda res: print(format_table(res)))
  return result


# Generic disa-bench flags -> keyword of a system's `disa_bench`.
BENCH_FLAGS = {'runs': 'runs', 'repeats': 'repeats', 'phases': 'phases', 'cfg': 'cfg',
               'torch': 'with_torch', 'torch_threads': 'torch_threads', 'dtypes': 'dtypes',
               'quality': 'quality', 'cfg_schedule': 'cfg_schedule', 'calibrate': 'calibrate'}


def logger():
  """Progress lines: stdout, or stderr under --json (stdout is the JSON), none off process 0."""
  import jax

  if jax.process_index() != 0:
    return lambda m: None
  if FLAGS.json:
    return lambda m: print(m, file=sys.stderr, flush=True)
  return print


def report(result, table) -> None:
  """Adds the command line to `result`; process 0 writes --json-out and prints the JSON or
  `table(result)`."""
  import jax

  result['command'] = ' '.join(['disa-bench'] + sys.argv[1:])
  if jax.process_index() != 0:   # every process ran the same timed work; one reports
    return
  if FLAGS.json_out:
    common.write_json(FLAGS.json_out, result)
  if FLAGS.json:
    print(json.dumps(result, indent=2, sort_keys=True))
  else:
    table(result)
