"""Shared absl flag groups of the commands (defined once per process, whichever command asks).

  define_config()    --config=FILE[:ARG] (ml_collections, locked: unknown keys and unknown
                     `--config.a.b` overrides are errors)
  define_model()     --checkpoint, --vae
  define_out()       --out, --overwrite
  define_output()    define_out() + --save_images, --save_tokens, --progress
  define_metric()    --metric, --inception, --ref_stats, --inception_batch_size, ...
  define_batch()     --batch_size, --seed
  define_guidance()  --cfg, --cfg_schedule, --temperature
  define_sampling()  define_batch() + define_guidance() + --num_images, --classes, --preset,
                     --strategy, --upper_steps, --lower_steps, --steps, --steps_file, --num_iter,
                     --max_timestep; and every system's own flags (`define_system_flags`:
                     `disa_jax/systems/<name>/flags.py`), applied by the config's system
  define_runs()      --runs (disa-bench, disa-evidence)
  define_mar_steps() --mar_steps (disa-demo, disa-evidence)
Every flag is defined here or in exactly one command module (its own flags), so any set of
command modules can be imported into one process (tests/test_seam.py checks it).
Numeric flags are checked where they enter (range and finiteness, absl validators built from
`validation.RULES`, the one table of ranges); the same rules are applied to the config after
`--config.*` overrides (`validate_sampling`, `validation.validate_config`), so a value is
refused whichever way it came in, with the same range in the message. The system of a config
(`config.system`) adds its own checks (`System.validate`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from absl import flags
from ml_collections import config_flags

from disa_jax import validation
from disa_jax.errors import UserError

FLAGS = flags.FLAGS

SAMPLING_FLAGS = ('num_images', 'batch_size', 'classes', 'seed', 'preset', 'strategy',
                  'upper_steps', 'lower_steps', 'steps', 'num_iter', 'cfg', 'cfg_schedule',
                  'temperature', 'max_timestep', 'cache')


def _defined(name: str) -> bool:
  return name in FLAGS


def define_config(help_text: str = 'Config file, e.g. configs/mar/base.py or '
                  'configs/mar/base.py:cpu.'):
  """--config (returns the flag holder; the same one when already defined)."""
  if _defined('config'):
    return _CONFIG_HOLDER[0]
  holder = config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)
  _CONFIG_HOLDER.append(holder)
  return holder


_CONFIG_HOLDER: list = []


def define_model():
  if _defined('checkpoint'):
    return
  flags.DEFINE_string('checkpoint', None, 'Model directory (disa-convert / disa-train output). '
                      'Default: config.checkpoint; none = random weights.')
  flags.DEFINE_string('vae', None, 'KL-16 VAE directory (disa-convert vae output).')


def define_out(default: str | None = None):
  """--out, --overwrite."""
  if _defined('out'):
    return
  flags.DEFINE_string('out', default, 'Output directory (must not exist unless --overwrite).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory written by this '
                    'project (never one it did not write, nor an input).')


def define_output():
  """--out, --overwrite, --save_images, --save_tokens, --progress."""
  define_out()
  if _defined('save_images'):
    return
  flags.DEFINE_bool('save_images', True, 'Write one PNG per image (else only the grid; '
                    'disa-eval: off unless given).')
  flags.DEFINE_bool('save_tokens', False, 'Also write tokens.npy when there is an image decoder '
                    '(always written without one).')
  define_progress()


def define_progress():
  """--progress (disa-sample's outputs, disa-demo)."""
  if not _defined('progress'):
    flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def define_batch():
  """--batch_size, --seed (sampling runs and disa-bench)."""
  if _defined('batch_size'):
    return
  flags.DEFINE_integer('batch_size', None, 'Global batch size (config.sampling.batch_size; '
                       'disa-bench: images per run, default 4).')
  flags.DEFINE_integer('seed', None, 'Random seed; image i uses fold_in(key(seed), i) '
                       '(disa-bench: also the weights, default 0).')
  rule_validator('batch_size', 'sampling', 'batch_size')
  rule_validator('seed', 'sampling', 'seed')


def define_guidance():
  """--cfg, --cfg_schedule, --temperature (sampling runs and disa-bench)."""
  if _defined('cfg'):
    return
  flags.DEFINE_float('cfg', None, 'Classifier-free guidance scale (finite, >= 0; 1.0 = off).')
  flags.DEFINE_enum('cfg_schedule', None, ['linear', 'constant'], 'CFG schedule.')
  flags.DEFINE_float('temperature', None, 'Solver-noise temperature (finite, > 0).')
  flags.DEFINE_string('cache', None, 'MAR LazyMAR feature caches (backbone + head): none | '
                      'lazymar[:interval=9,start=5,layer=3,margin=15,keep_bucket=16,'
                      'ratio_scale=1,head=7] (docs/caching.md).')
  rule_validator('cfg', 'sampling', 'cfg')
  rule_validator('temperature', 'sampling', 'temperature')


def define_sampling():
  """define_batch() + define_guidance() + the DiSA schedule and image-count flags."""
  define_batch()
  define_guidance()
  if _defined('num_images'):
    return
  flags.DEFINE_integer('num_images', None, 'Number of images (config.sampling.num_images).')
  flags.DEFINE_string('classes', None, 'Comma-separated class ids, cycled over the images.')
  flags.DEFINE_enum('preset', None, ['baseline', 'mar', 'disa'],
                    'Step schedule preset (mar = baseline: fixed steps, no clamp).')
  flags.DEFINE_enum('strategy', None, ['constant', 'linear', 'cosine', 'two-stage'],
                    'DiSA strategy.')
  flags.DEFINE_integer('upper_steps', None, 'Solver steps at the first AR stage (T_hi).')
  flags.DEFINE_integer('lower_steps', None, 'Solver steps at the last AR stage (T_lo).')
  flags.DEFINE_string('steps', None, 'Explicit steps per AR stage, "50,49,...".')
  flags.DEFINE_string('steps_file', None, 'Schedule file written by disa-tune: its steps per '
                      'AR stage and clamp replace the schedule flags.')
  flags.DEFINE_integer('num_iter', None, 'AR stages K.')
  flags.DEFINE_integer('max_timestep', None, 'Timestep clamp in [1, 999] (DiSA: 950); -1 '
                       'disables it.')
  for name in ('num_images', 'upper_steps', 'lower_steps', 'num_iter', 'max_timestep'):
    rule_validator(name, 'sampling', name)
  define_system_flags()


def define_system_flags():
  """Defines the flags of every system that has a `flags.py` (its `define()`; the names are
  the system's `System.flag_names`). Found by file, so no system package is imported here."""
  import disa_jax.systems as systems_pkg

  for root in systems_pkg.__path__:
    for name in sorted(os.listdir(root)):
      if os.path.isfile(os.path.join(root, name, 'flags.py')):
        module = importlib.import_module(f'disa_jax.systems.{name}.flags')
        if hasattr(module, 'define'):     # defined on import otherwise (idempotent)
          module.define()


def define_runs():
  """--runs (disa-bench, disa-evidence curves): label=preset:num_iter:upper[:lower[:strategy]]."""
  if _defined('runs'):
    return
  flags.DEFINE_string('runs', None, 'Comma-separated runs label=preset:num_iter:upper[:lower['
                      ':strategy]] (disa-bench: the first is the baseline; default '
                      'mar256,mar64,disa64; disa-evidence curves: default the MAR steps of '
                      '--mar_steps and the three DiSA strategies).')


def define_mar_steps():
  """--mar_steps: the MAR baseline's constant head steps (disa-demo: one count, default 100;
  disa-evidence curves: a list, default 5,10,25,50,100)."""
  if _defined('mar_steps'):
    return
  flags.DEFINE_string('mar_steps', None, 'Constant diffusion steps of the MAR baseline at every '
                      'AR step (disa-demo: one count, default 100; disa-evidence curves: a '
                      'comma-separated list, default 5,10,25,50,100).')


def rule_validator(flag: str, section: str, field: str):
  """An absl validator for `--flag` from `validation.RULES[section][field]` (the same range
  `validate_config` applies to `--config.section.field`), with a flag-level message."""
  rule = validation.RULES[section][field]

  def check(v):
    if v is None:
      return True
    try:
      validation.check_value(section, field, v, rule)
    except validation.InvalidConfigError:
      raise flags.ValidationError(f'--{flag} must be {rule.describe()}, got {v}') from None
    return True

  flags.register_validator(flag, check)


def check_sampling_value(name: str, value, flag: str | None = None) -> None:
  """`validation.RULES['sampling'][name]` on a value set by `--name` (or `--flag`) or
  `--config.sampling.name`; the message names the flag (and the config field)."""
  rule = validation.RULES['sampling'][name]
  try:
    validation.check_value('sampling', name, value, rule)
  except validation.InvalidConfigError:
    where = '' if flag else f' (set by --{name} or --config.sampling.{name})'
    raise validation.InvalidConfigError(
      f'--{flag or name} must be {rule.describe()}, got {value}{where}') from None


def apply_model_and_sampling(config):
  """Command-line flags override `config.sampling`, `config.checkpoint`, `config.tokenizer`."""
  with config.unlocked():
    for name in SAMPLING_FLAGS:
      if _defined(name):
        value = getattr(FLAGS, name)
        if value is not None:
          config.sampling[name] = value
      if FLAGS.steps_file:
        _apply_steps_file(config, FLAGS.steps_file)
    if _defined('checkpoint'):
      if FLAGS.checkpoint is not None:
        config.checkpoint = FLAGS.checkpoint
      if FLAGS.vae is not None:
        config.tokenizer.vae = FLAGS.vae
        if config.tokenizer.kind == 'none':    # CPU/tiny configs: --vae asks for images
          config.tokenizer.kind = 'kl16'
    _apply_system_flags(config)
  return config


def _apply_system_flags(config):
  """The config's system copies its own flags (`System.flag_names`) into the config."""
  from disa_jax.systems.base import system_of

  system = system_of(config)
  if system.flag_names:
    importlib.import_module(f'disa_jax.systems.{system.name}.flags').apply(config)
  given = [n for n in _system_flag_names() - set(system.flag_names)
           if n in FLAGS and FLAGS[n].present]
  if given:
    raise UserError(f'--{given[0]} does not apply to {system.name} configs; drop it')


def _system_flag_names() -> set:
  import disa_jax.systems as systems_pkg
  from disa_jax.systems.base import get_system

  names = set()
  for root in systems_pkg.__path__:
    for name in os.listdir(root):
      if os.path.isfile(os.path.join(root, name, 'flags.py')):
        names.update(get_system(name).flag_names)
  return names


def _apply_steps_file(config, path: str) -> None:
  """A disa-tune schedule file sets steps, num_iter and the clamp (`disa_jax.tune`)."""
  from disa_jax.tune import load_schedule

  if FLAGS.steps is not None:
    raise UserError('--steps and --steps_file both give the steps per AR stage; pass one')
  sched = load_schedule(os.path.expanduser(path), num_iter=FLAGS.num_iter,
                        system=config.get('system', None))
  file_clamp = -1 if sched.max_timestep is None else sched.max_timestep   # -1: no clamp
  if FLAGS.max_timestep is not None and FLAGS.max_timestep != file_clamp:
    raise UserError(f'--max_timestep={FLAGS.max_timestep} contradicts the clamp {file_clamp} the '
                    f'steps file {path} was tuned with; drop --max_timestep')
  config.sampling.steps = ','.join(map(str, sched.steps))
  config.sampling.num_iter = sched.num_iter
  config.sampling.max_timestep = file_clamp


def check_cache(config) -> None:
  """`sampling.cache` (`--cache`) is MAR's backbone cache: refused for other systems."""
  from disa_jax.systems.base import system_of

  name = system_of(config).name
  if config.sampling.get('cache', '') not in ('', 'none') and name != 'mar':
    raise UserError(f'--cache applies to MAR only (this config is {name}); drop it')


def validate_sampling(config) -> None:
  """Range and finiteness of `config.sampling` (flags and `--config.sampling.*` alike), the
  input paths, the batch size against the data-parallel devices, then the system's own
  checks. Raises UserError; touches nothing on disk."""
  from disa_jax.systems.base import system_of

  s = config.sampling
  for name in ('num_images', 'batch_size', 'cfg', 'temperature', 'max_timestep'):
    if name in s:
      check_sampling_value(name, s.get(name))
  if s.cfg_schedule not in ('linear', 'constant'):
    raise UserError(f'--cfg_schedule must be linear or constant, got {s.cfg_schedule!r}')
  if config.get('checkpoint') and not os.path.exists(os.path.expanduser(config.checkpoint)):
    raise UserError(f'checkpoint {config.checkpoint} does not exist')
  vae = config.tokenizer.get('vae', '') if 'tokenizer' in config else ''
  if vae and not os.path.exists(os.path.expanduser(vae)):
    raise UserError(f'VAE directory {vae} does not exist')
  check_cache(config)
  system = system_of(config)
  if system.validate is not None:
    system.validate(config)
  if 'runtime' in config:      # before any compile: a batch the devices do not divide
    from disa_jax.engine import runner

    runner.check_batch_size(s.batch_size, runner.make_mesh(config))


def input_paths(config) -> list[str]:
  """The paths a sampling run reads (an output must never replace one of them)."""
  paths = [config.get('checkpoint', '')]
  if 'tokenizer' in config:
    paths += [config.tokenizer.get('vae', ''), config.tokenizer.get('text', '')]
  if 'sampling' in config:
    paths.append(config.sampling.get('prompts_file', ''))
  return [p for p in paths if p]


def define_metric(default: str = 'inception'):
  """--metric, --inception, --ref_stats, --inception_batch_size, --precision_recall."""
  if _defined('metric'):
    return
  flags.DEFINE_string('metric', default, 'inception | digits | none | module:Class '
                      '(disa-evidence: default digits for pixel configs, else inception).')
  flags.DEFINE_string('inception', None, 'FID Inception directory (`disa-convert inception`).')
  flags.DEFINE_string('ref_stats', None, 'Reference statistics .npz (ADM VIRTUAL_imagenet256_'
                      "labeled.npz or MAR's fid_stats/adm_in256_stats.npz).")
  flags.DEFINE_integer('inception_batch_size', 0, 'Images per Inception call (0: 64 per '
                       'accelerator, 8 per CPU device).')
  flags.DEFINE_bool('precision_recall', True, 'Compute precision/recall when the reference has '
                    'images (arr_0) or features.')


def build_metric(name: str, *, inception=None, ref_stats=None, batch_size=0,
                 precision_recall=True, cache=None):
  """A quality metric by name (None for 'none'), with one-line errors for bad input."""
  from disa_jax.checkpoint import CheckpointError
  from disa_jax.eval.quality import get_quality_metric

  if name == 'none':
    return None
  try:
    if name == 'inception':
      return get_quality_metric('inception', inception=inception, ref_stats=ref_stats,
                                batch_size=batch_size or None,
                                precision_recall=precision_recall, ref_features_cache=cache)
    if ':' in name:
      module, _, cls = name.partition(':')
      return getattr(importlib.import_module(module), cls)()
    return get_quality_metric(name)
  except (ValueError, CheckpointError, ImportError, AttributeError) as e:
    raise UserError(f'--metric={name}: {e}') from None


def system_command(config, command: str):
  """The system's own body of `command` (`disa_jax.systems.base.find_command`), else None;
  refuses flags of other systems."""
  from disa_jax.systems.base import find_command, system_of

  system = system_of(config)
  check_system_flags(system)
  return find_command(system, command)


def run_command(config, command: str, shared=None, *, name: str = ''):
  """The one dispatch of every command: checks that `config` is a config naming a known
  system, takes the system's own body of `command` or else `shared`, sets up the runtime
  (logging, distributed init, compilation cache) and runs `body(config)`."""
  from disa_jax.cli import common

  common.check_config_type(config)
  body = system_command(config, command) or shared
  if body is None:
    from disa_jax.systems.base import system_name

    raise UserError(f'{name or command}: the {system_name(config)} system does not provide this '
                    'command')
  common.setup_runtime(config)
  return body(config)


def check_system_flags(system) -> None:
  """UserError when a flag another system defines was given for a run of `system`."""
  import pkgutil

  import disa_jax.systems as systems
  from disa_jax.systems.base import get_system

  own = set(system.flag_names)
  for info in pkgutil.iter_modules(systems.__path__):
    if not info.ispkg or info.name == system.name:
      continue
    if not importlib.util.find_spec(f'disa_jax.systems.{info.name}.flags'):
      continue
    for name in get_system(info.name).flag_names:
      if name not in own and name in FLAGS and FLAGS[name].present:
        raise UserError(f'--{name} is a flag of the {info.name} system; this config runs '
                        f'{system.name} (config.system); drop it or use a {info.name} config')
