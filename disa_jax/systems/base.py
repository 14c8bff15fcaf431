"""The seam between the shared commands and a generator system (MAR, FlowAR, xAR, Harmon, D-AR).

A system is a package `disa_jax.systems.<name>` whose `__init__` defines `SYSTEM`, a `System`.
Commands find it by name with importlib (`get_system(config.system)`, or the `kind` recorded in
a model directory's meta.json), so adding a system never edits a central table.

Vocabulary (the same for every system):
  stage       one autoregressive step of the outer loop: a MAR iteration, a FlowAR scale, an
              xAR cell, a Harmon MAR iteration, a D-AR token block. DiSA is solver-agnostic: it
              only chooses a number of inner solver steps per stage (`StepPlan.steps`, from
              `disa_jax.schedules`; presets `baseline` (alias `mar`) and `disa`).
  condition   what a sample is conditioned on: a class label (int32) for the class-conditional
              systems, a prompt index into `config.sampling.prompts` for text-conditional ones.
  tokens      what the sampler returns: continuous latents [B, L, C] (MAR, FlowAR, xAR,
              Harmon) or discrete ids [B, L] (D-AR); `make_decoder(...).decode(tokens)` turns
              them into uint8 images [B, H, W, 3] (a VAE, pixels, or D-AR's diffusion decoder).

Shape of one run (what `disa-sample` does for any system):
    system = get_system(config.system)
    plan   = system.stage_plan(config.sampling)             # steps per stage, validated
    model, source = system.build_model(config, seed=...)    # checkpoint or random weights
    sampler = system.make_sampler(model, config, mesh)      # .generate(...), .last_stats
    conds  = system.conditions(config, num_images)          # one condition per image
    tokens = sampler.generate(conds[batch], key, steps=plan.steps, ...)
    images = system.make_decoder(config, model).decode(tokens)

The sampler contract (`Sampler` below): `plan(batch_size, steps=..., **sampling)` returns a
report-able bucket plan, `compile(plan)` compiles it ahead of time (returns seconds),
`generate(conditions, key, *, steps, image_ids, progress, **sampling)` returns tokens, and
`last_stats` (with `.compile_s`, `.plan.report()`, `.as_dict()`) and `compile_log`
({(bucket name, static shape...): seconds}) describe the last call, so the engine's batching
loop (`disa_jax.engine.runner.sample_batches`) and the metrics are shared.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from disa_jax.errors import UserError


class Sampler(Protocol):
  """What `System.make_sampler` returns (MAR: `disa_jax.Sampler`)."""

  mesh: Any
  compile_log: dict
  last_stats: Any

  def plan(self, batch_size: int, *, steps: Sequence[int], **sampling) -> Any: ...

  def compile(self, plan: Any) -> float: ...

  def generate(self, conditions, key, *, steps: Sequence[int], image_ids=None, progress=None,
               **sampling) -> Any: ...


class Decoder(Protocol):
  """tokens -> uint8 images [B, H, W, 3] (KL-16 VAE, pixels, a diffusion decoder)."""

  def decode(self, tokens) -> Any: ...


@dataclasses.dataclass(frozen=True)
class System:
  """Everything the shared commands need from one system. Only `name`, `build_model`,
  `load_model`, `stage_plan`, `make_sampler`, `conditions`, `condition_count` and
  `make_decoder` are required;
  the rest are None when a system does not offer that command.

  name            'mar' (= the package name under `disa_jax.systems`).
  build_model     (config, *, seed) -> (model, source description): `config.checkpoint`
                  loaded (checked against `config.model`), or random weights.
  load_model      (path, *, expect_config=None, overrides=None) -> model: a model directory.
  stage_plan      (config.sampling) -> StepPlan: steps per stage + clamp (UserError if bad).
  make_sampler    (model, config, mesh) -> Sampler.
  conditions      (config, num_images, *, order='cycle'|'blocks') -> np.ndarray of
                  conditions, one per image (class ids or prompt indices).
  condition_count (config) -> int: distinct conditions (classes, prompts); evaluation sets
                  default to 50 images per condition.
  make_decoder    (config, model) -> Decoder or None (then tokens and a preview are written).
  token_preview   (model, tokens) -> uint8 images, a look at tokens without a decoder.
  validate        (config) -> None: raises UserError for a config this system cannot run
                  (called before any output directory is touched).
  converter       module name whose `convert(torch_checkpoint, out, *, weights, variant,
                  overwrite, **flags)` writes a model directory (`disa-convert <name>`).
  flops           (model_config, plan) -> dict of FLOPs per image (`disa-bench`).
  train_step      module name providing `TrainState`, `train_step(...)` (`disa-train`).
  flag_names      names of extra absl flags the system defines (in its own `flags` module).
  condition_text  (config) -> list[str]: the text of each condition id (Harmon's prompts);
                  `disa-sample` writes image i's text as line i + 1 of `prompts.txt`. None: the
                  conditions are class ids (labels.npy says it all).
  commands        module holding the system's command bodies `<command>_command(config)`
                  (see `find_command`); None: `disa_jax.systems.<name>.commands` when that
                  module exists.
  """

  name: str
  build_model: Callable
  load_model: Callable
  stage_plan: Callable
  make_sampler: Callable
  conditions: Callable
  condition_count: Callable
  make_decoder: Callable
  token_preview: Callable | None = None
  validate: Callable | None = None
  converter: str | None = None
  flops: Callable | None = None
  train_step: str | None = None
  flag_names: tuple[str, ...] = ()
  commands: str | None = None
  condition_text: Callable | None = None


DEFAULT_SYSTEM = 'mar'


def system_name(config) -> str:
  """`config.system` ('mar' for configs written before systems had names)."""
  name = config.get('system', None) if config is not None else None
  return name or DEFAULT_SYSTEM


def get_system(name: str) -> System:
  """`disa_jax.systems.<name>.SYSTEM`; a one-line UserError for an unknown name."""
  if not isinstance(name, str) or not name.isidentifier():
    raise UserError(f'system name {name!r} is not a Python identifier; set config.system to '
                    'the name of a package under disa_jax/systems (e.g. mar)')
  module_name = f'disa_jax.systems.{name}'
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise UserError(f'unknown system {name!r}: no package {module_name}; set config.system '
                    'to one of the packages under disa_jax/systems (e.g. mar)') from None
  system = getattr(module, 'SYSTEM', None)
  if not isinstance(system, System):
    raise UserError(f'{module_name} does not define SYSTEM (a disa_jax.systems.base.System)')
  return system


def system_of(config) -> System:
  return get_system(system_name(config))


# The one way a system provides or overrides a command. Each command-line tool loads the config,
# finds the system, and runs `find_command(system, command)` if it is not None, else the shared
# body named here. A body is `<command>_command(config)`: it receives the config as loaded from
# --config (flags not yet applied), reads the command's absl flags itself, does its own checks
# before writing anything, and prints / writes the command's output.
COMMANDS = {
  'sample': 'disa_jax.cli.sample.sample_command (tokens from the engine, then the decoder)',
  'bench': 'none: every system brings its own (most through disa_jax.cli.bench_run.run_bench)',
  'eval': 'disa_jax.cli.eval.eval_command (resumable shards, shared metrics)',
  'train': 'disa_jax.cli.train.train_command (train/loop.py with the `train_step` hook)',
}


def commands_module(system: System) -> str | None:
  """The module holding `system`'s command bodies, or None when it has none."""
  if system.commands:
    return system.commands
  name = f'disa_jax.systems.{system.name}.commands'
  try:
    return name if importlib.util.find_spec(name) is not None else None
  except ModuleNotFoundError:
    return None


def find_command(system: System, command: str) -> Callable | None:
  """`system`'s own body of `command` (one of `COMMANDS`), or None to use the shared body."""
  if command not in COMMANDS:
    raise ValueError(f'unknown command {command!r}; one of {sorted(COMMANDS)}')
  module = commands_module(system)
  if module is None:
    return None
  return getattr(importlib.import_module(module), f'{command}_command', None)
