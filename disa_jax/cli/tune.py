"""disa-tune: a calibrated per-AR-step schedule from a quality budget.

  disa-tune --out=tuned.json                          # the bundled digits model, budget 0.1
  disa-tune --config=configs/mar/base.py --checkpoint=ckpt/mar_base --budget=0.2 \\
      --num_iter=64 --out=tuned_mar_b.json
  disa-tune --measured=tuned.json --budget=0.5 --out=tuned_b05.json   # re-select, no probe
  disa-sample --steps_file=tuned.json --out=outputs/tuned
  disa-evidence curves --runs=tuned=file:tuned.json,disa-linear=disa:16:50:5:linear ...

On a probe batch (--probe_images images, the config's CFG / temperature / clamp) the reference
schedule (--reference_steps at every AR stage) is run once to collect every stage's decoder
conditions; then, per stage, --draws head samples per condition with each candidate step count
are compared with two independent reference draws (squared W2 between per-condition Gaussian
fits, read against the floor of the two reference draws; see disa_jax/tune.py and docs/tune.md).
Each stage gets the fewest candidate steps with distance <= (1 + --budget) x floor. The schedule
file (JSON, written atomically) holds the steps, the clamp and every measured distance.
"""

from __future__ import annotations

import time

from absl import flags

from disa_jax.cli import common
from disa_jax.cli import flags as cli_flags
from disa_jax.tune import DEFAULT_CANDIDATES

_CONFIG = cli_flags.define_config(
  'Config file (default: the bundled digits model, configs/mar/digits.py).')
cli_flags.define_model()
cli_flags.define_out()
cli_flags.define_sampling()

flags.DEFINE_float('budget', 0.1, 'Allowed distance above the noise floor, as a fraction of '
                   'the floor (0 = indistinguishable from the reference at this probe size).')
flags.DEFINE_integer('reference_steps', 100, 'Steps of the many-step reference (every stage).',
                     lower_bound=1)
flags.DEFINE_string('candidates', ','.join(map(str, DEFAULT_CANDIDATES)),
                    'Comma-separated candidate step counts per stage.')
flags.DEFINE_integer('probe_images', 16, 'Images in the probe batch.', lower_bound=1)
flags.DEFINE_string('measured', None, 'A schedule file written by disa-tune: re-select its '
                    'measured distances under --budget instead of measuring again.')
flags.DEFINE_integer('draws', 16, 'Head samples per condition (>= 2).', lower_bound=2)
flags.register_validator('budget', lambda v: v is not None and v == v and 0 <= v < float('inf'),
                         message='--budget must be a finite number >= 0')

FLAGS = flags.FLAGS


def tune(config, out: str, *, budget: float, reference_steps: int, candidates: list[int],
         probe_images: int, draws: int, overwrite: bool = False) -> dict:
  """Measures, selects and writes the schedule file; returns its JSON content."""
  import os

  import jax

  from disa_jax import tune as tn
  from disa_jax.engine import runner
  from disa_jax.systems.base import system_of

  cli_flags.validate_sampling(config)
  system = system_of(config)
  if system.name != 'mar':
    raise common.CliError(f'disa-tune measures MAR models only for now (config.system is '
                          f'{system.name!r})')
  plan = runner.step_plan(config)
  ks = tn.check_candidates(candidates, reference_steps)
  real_out = os.path.realpath(out)
  for inp in cli_flags.input_paths(config):
    ri = os.path.realpath(os.path.expanduser(inp))
    if real_out == ri or real_out.startswith(ri.rstrip(os.sep) + os.sep):
      raise common.CliError(f'output {out} would overwrite the input {inp}; choose another --out')
  if os.path.isdir(out):
    raise common.CliError(f'output {out} is a directory; give a file name such as tuned.json')
  if os.path.lexists(out) and not overwrite:
    raise common.CliError(f'output {out} already exists; pass --overwrite or choose another --out')
  s = config.sampling
  setup = runner.setup_sampling(config, seed=s.seed)
  labels = system.conditions(config, probe_images)
  t0 = time.perf_counter()
  measured = tn.measure_mar(
    setup.sampler, labels, jax.random.key(s.seed), num_iter=plan.num_iter,
    max_timestep=plan.max_timestep, cfg=s.cfg, cfg_schedule=s.cfg_schedule,
    temperature=s.temperature, reference_steps=reference_steps, candidates=ks, draws=draws,
    progress=lambda k: print(f'  candidate {k} steps measured', flush=True))
  steps, choices = tn.select_schedule(measured, budget)
  over = [i for i, c in enumerate(choices) if not c.within_budget]
  info = {
    'budget': budget, 'reference_steps': reference_steps, 'candidates': ks,
    'draws_per_condition': draws, 'probe_images': probe_images, 'seed': s.seed,
    'cfg': s.cfg, 'cfg_schedule': s.cfg_schedule, 'temperature': s.temperature,
    'model': config.get('checkpoint') or setup.source, 'config': config.get('name', ''),
    'distance': 'mean squared W2 between per-condition diagonal Gaussian fits (docs/tune.md)',
    'floor': measured['floor'], 'conditions_per_stage': measured['conditions'],
    'distances': {str(k): v for k, v in measured['distances'].items()},
    'over_budget_stages': over, 'measure_s': round(time.perf_counter() - t0, 2),
  }
  schedule = tn.Schedule(tuple(steps), plan.max_timestep, system.name, info)
  tn.save_schedule(out, schedule, overwrite=overwrite)
  return schedule.to_json()


def reselect(measured_path: str, out: str, *, budget: float, overwrite: bool = False) -> dict:
  """A new schedule from the distances stored in `measured_path` under another budget."""
  from disa_jax import tune as tn

  old = tn.load_schedule(measured_path)
  try:
    measured = {'floor': [float(x) for x in old.info['floor']],
                'distances': {int(k): [float(x) for x in v]
                              for k, v in old.info['distances'].items()}}
    if any(len(v) != old.num_iter for v in [measured['floor'], *measured['distances'].values()]):
      raise ValueError
  except (KeyError, TypeError, ValueError, AttributeError):
    raise tn.TuneError(f'steps file {measured_path}: has no complete "floor" / "distances" '
                       'measurements to re-select from') from None
  steps, choices = tn.select_schedule(measured, budget)
  info = dict(old.info, budget=budget, reselected_from=measured_path,
              over_budget_stages=[i for i, c in enumerate(choices) if not c.within_budget])
  schedule = tn.Schedule(tuple(steps), old.max_timestep, old.system, info)
  tn.save_schedule(out, schedule, overwrite=overwrite)
  return schedule.to_json()


def _run(argv):
  if len(argv) > 1:
    raise common.CliError(f'unexpected argument {argv[1]!r}; disa-tune takes only flags')
  if not FLAGS.out:
    raise common.CliError('--out=FILE is required (the schedule file to write, e.g. tuned.json)')
  if FLAGS.measured:
    data = reselect(FLAGS.measured, FLAGS.out, budget=FLAGS.budget, overwrite=FLAGS.overwrite)
    print(f'steps per AR stage: {",".join(map(str, data["steps"]))} (budget {FLAGS.budget}, '
          f're-selected from {FLAGS.measured}); wrote {FLAGS.out}')
    return
  config = common.config_value(_CONFIG)
  if config is None:  # the bundled digits model
    from disa_jax.systems.mar.variants import digits_config

    config = digits_config()
  common.check_config(config)
  config = cli_flags.apply_model_and_sampling(config)
  common.setup_runtime(config)
  cands = common.parse_int_list(FLAGS.candidates, '--candidates')
  data = tune(config, FLAGS.out, budget=FLAGS.budget, reference_steps=FLAGS.reference_steps,
              candidates=cands, probe_images=FLAGS.probe_images, draws=FLAGS.draws,
              overwrite=FLAGS.overwrite)
  print(f'steps per AR stage: {",".join(map(str, data["steps"]))} (clamp '
        f'{data["max_timestep"]}); {len(data["over_budget_stages"])} stages over budget; '
        f'wrote {FLAGS.out}')


def run():
  common.main(_run)


if __name__ == '__main__':
  run()
