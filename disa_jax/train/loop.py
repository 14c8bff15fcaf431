"""The training loop behind `disa-train` (LTH14/mar `main_mar.py` + `engine_mar.py`).

  workdir/config.json        the config of the run (checked on resume)
  workdir/checkpoints/<step> orbax: train state (raw + EMA weights, AdamW, step, RNG) and the
                             grain iterator position of every process
  workdir/metrics.jsonl      JSON lines; workdir/tensorboard/ event files

A run always resumes from the newest checkpoint in its workdir, so a killed job restarted
with the same command continues exactly (same batches, same random numbers). The same code
runs on one CPU, on fake CPU devices and on a TPU pod: the batch is sharded over the mesh,
the state replicated or FSDP-sharded, and each process feeds its own slice of the batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax import integrity, validation
from disa_jax import sharding as shd
from disa_jax.errors import UserError
from disa_jax.systems.mar.model import MAR, MARConfig
from disa_jax.train import optim
from disa_jax.train.partition import state_shardings
from disa_jax.train.step import TrainState, train_step

_log = logging.getLogger(__name__)


class TrainingError(UserError):
  """A run that cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
  """The loss or the gradients became NaN/Inf."""


@dataclasses.dataclass
class RunResult:
  step: int
  last_metrics: dict
  workdir: Path
  exported: Path | None = None
  train_s: float = 0.0


# ------------------------------------------------------------------------------------------
# Data
def resolve_data(config, model_cfg: MARConfig) -> tuple[Path, float]:
  """(cache directory, latent scale) for `config.data`; builds the mnist/digits cache if needed."""
  from disa_jax.data import records

  d = config.data
  if d.kind == 'digits':
    from disa_jax.data import digits

    cache = digits.ensure_cache(d.cache_dir)
  elif d.kind == 'mnist':
    from disa_jax.data import mnist

    cache = mnist.ensure_cache(d.cache_dir)
  elif d.kind == 'cache':
    if not d.cache_dir:
      raise TrainingError('config.data.cache_dir is empty; build a cache with `disa-cache` '
                          'and pass --config.data.cache_dir=DIR')
    cache = Path(d.cache_dir).expanduser()
  else:
    raise TrainingError(f'config.data.kind must be mnist, digits or cache, got {d.kind!r}')
  meta = records.read_meta(cache)
  if isinstance(model_cfg, MARConfig):
    grid = model_cfg.img_size // model_cfg.vae_stride
    want = [grid, grid, model_cfg.vae_embed_dim]
  else:                               # another system's trainer gives the moments shape
    want = list(model_cfg)
  if list(meta['shape']) != want:
    raise TrainingError(
      f'cache {cache} holds moments of shape {meta["shape"]} but the model expects {want} '
      '(img_size / vae_stride, vae_embed_dim); use the matching config or cache')
  scale = d.latent_scale if d.latent_scale > 0 else float(meta.get('latent_scale', 0.2325))
  return cache, scale


# ------------------------------------------------------------------------------------------
# State
def _init_state(model_cfg: MARConfig, tx, seed: int) -> TrainState:
  model = MAR(model_cfg, rngs=nnx.Rngs(seed))
  _, params = nnx.split(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed + 1)))


def graphdef_of(model_cfg: MARConfig):
  abstract = nnx.eval_shape(lambda: MAR(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  extra = [p for p, v in nnx.to_flat_state(state) if not isinstance(v, nnx.Param)]
  if extra:  # everything trainable must be an nnx.Param for the optimizer and EMA
    raise TrainingError(f'MAR has non-parameter state {extra[:3]}; cannot train it')
  return graphdef


class MARTrainer:
  """What the loop needs from a system (MAR here; another system's `train_step` module
  defines `Trainer(config)` with the same members)."""

  kind = 'mar'

  def __init__(self, config):
    self.model_cfg = MARConfig.from_dict(dict(config.model))
    self.data_shape = self.model_cfg
    self.graphdef = graphdef_of(self.model_cfg)
    self.last_t_fraction = float(config.train.get('last_t_fraction', 0.0))

  def init_state(self, tx, seed: int):
    return _init_state(self.model_cfg, tx, seed)

  def step_fn(self, *, tx, ema_rate: float, latent_scale: float):
    return partial(train_step, graphdef=self.graphdef, tx=tx, ema_rate=ema_rate,
                   latent_scale=latent_scale, patch_size=self.model_cfg.patch_size,
                   last_t_fraction=self.last_t_fraction)


def trainer_of(config):
  """The system's trainer (`System.train_step` module's `Trainer`; MAR: `MARTrainer`)."""
  import importlib

  from disa_jax.systems.base import system_of

  system = system_of(config)
  if system.name == 'mar':
    return MARTrainer(config)
  module = importlib.import_module(system.train_step) if system.train_step else None
  if module is None or not hasattr(module, 'Trainer'):
    raise TrainingError(f'disa-train does not support the {system.name} system yet')
  return module.Trainer(config)


def _check_config(workdir: Path, config) -> None:
  """Stores config.json on the first start; on resume the model must be the same."""
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    stored = integrity.read_json(path, what='run config')
    diff = integrity.config_diff(stored, current, may_change=integrity.train_may_change())
    if diff:
      raise TrainingError(
        f'workdir {workdir} holds a run with other settings ({"; ".join(diff)}); a resumed run '
        'must be the same run: use the original config, or a new --workdir')
    if stored != current and jax.process_index() == 0:   # e.g. a longer num_steps
      from disa_jax.io.output import atomic_file

      with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(current, indent=2, sort_keys=True))
  else:
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(current, indent=2, sort_keys=True))


def _checkpoint_manager(workdir: Path, tc):
  import grain
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=int(tc.keep_checkpoints), create=True,
    enable_async_checkpointing=bool(tc.get('async_checkpointing', False)))
  return ocp.CheckpointManager(
    (workdir / 'checkpoints').absolute(), item_names=('state', 'data'), options=options,
    item_handlers={'state': ocp.StandardCheckpointHandler(),
                   'data': grain.checkpoint.CheckpointHandler()})


def _restore_newest_good(mngr, workdir: Path, tc, restore):
  """(manager, step, state) of the newest checkpoint that restores; unreadable newer ones are
  moved to `workdir/corrupt_checkpoints/` with a warning (nothing is deleted). (mngr, None,
  None) when none restores."""
  import shutil

  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return mngr, step, restore(mngr, step)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on bad files
      if jax.process_count() > 1:
        raise TrainingError(f'checkpoint {step} in {workdir / "checkpoints"} cannot be '
                            f'restored ({str(e).strip().splitlines()[0][:160]})') from None
      aside = workdir / 'corrupt_checkpoints' / f'{step}-{int(time.time())}'
      aside.parent.mkdir(parents=True, exist_ok=True)
      mngr.close()
      shutil.move(str(workdir / 'checkpoints' / str(step)), str(aside))
      integrity.warn(f'checkpoint {step} in {workdir / "checkpoints"} cannot be restored '
                     f'({e.__class__.__name__}: {str(e).strip().splitlines()[0][:120]}); moved '
                     f'it to {aside} and resuming from the previous checkpoint')
      mngr = _checkpoint_manager(workdir, tc)
  return mngr, None, None


def _save(mngr, step: int, state, iterator) -> None:
  import grain
  import orbax.checkpoint as ocp

  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(iterator)),
            force=True)
  # finished saves get their checksums (with async saving, `step` may still be in flight)
  _seal_checkpoints(mngr, below=step if mngr.is_saving_in_progress() else None)


def _seal_checkpoints(mngr, *, below: int | None = None) -> None:
  """checksums.json for every finished checkpoint (steps < `below`; all when None) that has
  none (`integrity.seal_checkpoint`; verified on restore)."""
  if jax.process_index() != 0:
    return
  for step in mngr.all_steps():
    if below is None or step < below:
      integrity.seal_checkpoint(Path(mngr.directory) / str(step))


def restore_state(workdir, config, *, mesh=None, step: int | None = None):
  """(TrainState, step) of the newest (or given) checkpoint in `workdir` (for export)."""
  import orbax.checkpoint as ocp

  workdir = Path(workdir).expanduser()
  trainer = trainer_of(config)
  tc = config.train
  tx = optim.make_optimizer(tc, tc.batch_size)
  mesh = mesh or shd.make_mesh(1)
  abstract = jax.eval_shape(partial(trainer.init_state, tx, tc.seed))
  shardings = state_shardings(abstract, mesh)
  mngr = _checkpoint_manager(workdir, tc)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise TrainingError(f'no checkpoint in {workdir / "checkpoints"}; train first with '
                        f'`disa-train --workdir={workdir}`')
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)
  integrity.verify_checkpoint(workdir / 'checkpoints' / str(step))
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  return out.state, step


def export_model(out, state: TrainState, config, *, weights: str = 'ema', step: int = 0,
                 overwrite: bool = False) -> Path:
  """Writes the EMA (or raw) weights as a disa_jax model directory (`load_mar`-able)."""
  from disa_jax.checkpoint import save_model

  if weights not in ('ema', 'raw'):
    raise TrainingError(f'export weights must be ema or raw, got {weights!r}')
  trainer = trainer_of(config)
  params = jax.device_get(state.ema if weights == 'ema' else state.params)
  model = nnx.merge(trainer.graphdef, params)
  meta = {'source': 'disa-train', 'config': config.get('name', ''), 'step': int(step),
          'weights': weights, 'tokenizer': dict(config.tokenizer)}
  return save_model(out, model, kind=trainer.kind, model_config=trainer.model_cfg.to_dict(),
                    meta=meta, overwrite=overwrite)


# ------------------------------------------------------------------------------------------
def train(config, workdir, *, stop_at: int | None = None, export: str | None = None,
          export_weights: str = 'ema', overwrite_export: bool = False,
          print_fn=print) -> RunResult:
  """Trains (or resumes) the run in `workdir` up to `config.train.num_steps` updates.

  `stop_at` ends this invocation early (the run resumes later); `export` writes the final
  weights as a model directory.
  """
  from disa_jax.data import pipeline
  from disa_jax.train.metrics import MetricWriter, Report, parameter_overview

  workdir = Path(workdir).expanduser().absolute()
  tc = config.train
  validation.validate_config(config)
  trainer = trainer_of(config)
  if tc.num_steps < 1 or tc.batch_size < 1:
    raise TrainingError('config.train.num_steps and batch_size must be >= 1')
  if tc.get('last_t_fraction', 0.0) and trainer.kind != 'mar':
    raise TrainingError(f'config.train.last_t_fraction applies to MAR\'s diffusion head only, not '
                        f'to {trainer.kind}; set it to 0')
  mesh = shd.make_mesh(tc.num_devices or None, fsdp=tc.fsdp)
  if tc.batch_size % shd.data_size(mesh):
    raise TrainingError(f'global batch {tc.batch_size} is not divisible by the {shd.data_size(mesh)} '
                        'devices of the mesh; change --config.train.batch_size')
  _check_config(workdir, config)
  cache, scale = resolve_data(config, trainer.data_shape)
  dataset = pipeline.make_dataset(cache, config.data.split, global_batch=tc.batch_size,
                                  seed=tc.seed, flip_prob=config.data.flip_prob)
  iterator = pipeline.make_iterator(dataset)

  tx = optim.make_optimizer(tc, tc.batch_size)
  lr_fn = optim.lr_schedule(tc, tc.batch_size)
  init = partial(trainer.init_state, tx, tc.seed)
  abstract = jax.eval_shape(init)
  st_sh = state_shardings(abstract, mesh)
  batch_sh = shd.batch_sharded(mesh)
  repl = shd.replicated(mesh)

  import orbax.checkpoint as ocp

  mngr = _checkpoint_manager(workdir, tc)
  start, state = None, None
  if mngr.latest_step() is not None:
    import grain

    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, st_sh)

    def restore(manager, step):
      integrity.verify_checkpoint(workdir / 'checkpoints' / str(step))
      state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(iterator))).state
      if jax.process_count() == 1:     # altered bytes that still decode: NaN/Inf weights
        integrity.check_finite_arrays({'params': state.params, 'ema': state.ema},
                                      str(workdir / 'checkpoints' / str(step)))
      return state

    # a truncated newest checkpoint: set it aside with a warning, use the previous good one
    mngr, start, state = _restore_newest_good(mngr, workdir, tc, restore)
  if start is not None:
    print_fn(f'resumed from {workdir / "checkpoints"} at step {start}')
  else:
    start = 0
    state = jax.jit(init, out_shardings=st_sh)()
  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main, tensorboard=tc.get('tensorboard', True))
  writer.truncate_after(start)

  step_fn = jax.jit(
    trainer.step_fn(tx=tx, ema_rate=tc.ema_rate, latent_scale=scale),
    in_shardings=(st_sh, batch_sh), out_shardings=(st_sh, repl), donate_argnums=(0,))

  end = tc.num_steps if stop_at is None else min(stop_at, tc.num_steps)
  if is_main and start < end:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    print_fn(f'training {config.get("name", "")}: {n_params / 1e6:.2f}M params, global batch '
             f'{tc.batch_size} on {jax.device_count()} devices (mesh {dict(mesh.shape)}), '
             f'lr {optim.learning_rate(tc, tc.batch_size):.2e}, steps {start} -> {end}')
    print_fn(parameter_overview(abstract.params))
  report = Report(start, tc.num_steps)
  window: dict[str, list] = {}
  pending = None
  last: dict = {}
  t_start = time.perf_counter()
  try:
    for step in range(start, end):
      local = next(iterator)
      batch = {k: shd.global_batch_array(np.asarray(v), mesh) for k, v in local.items()}
      state, metrics = step_fn(state, batch)
      if pending is not None:
        last = _check(*pending, window)
      pending = (step, metrics)
      done = step + 1
      if done % tc.log_every == 0 or done == end:
        last = _check(*pending, window)
        pending = None
        scalars = {k: float(np.mean(v)) for k, v in window.items()}
        scalars['lr'] = float(lr_fn(done - 1))
        window.clear()
        writer.write(done, scalars)
        if is_main:
          print_fn(report.line(done, scalars))
      if done % tc.checkpoint_every == 0 or done == end:
        if pending is not None:
          last = _check(*pending, window)
          pending = None
        _save(mngr, done, state, iterator)
    mngr.wait_until_finished()
    _seal_checkpoints(mngr)
  finally:
    writer.close()
  train_s = time.perf_counter() - t_start
  final = int(jax.device_get(state.step))
  result = RunResult(step=final, last_metrics=last, workdir=workdir, train_s=train_s)
  mngr.close()
  if export:
    result.exported = export_model(export, state, config, weights=export_weights, step=final,
                                   overwrite=overwrite_export)
    print_fn(f'exported the {export_weights} weights of step {final} to {result.exported}')
  return result


def _check(step: int, metrics, window: dict) -> dict:
  """Host copy of one step's metrics; raises `TrainingDiverged` on NaN/Inf."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not m['finite']:
    raise TrainingDiverged(
      f'loss is {m["loss"]} (gradient norm {m["grad_norm"]}) at step {step + 1}; the update '
      'was skipped and training stopped. The newest checkpoint holds finite weights; lower '
      '--config.train.blr, lengthen the warmup, or train in float32 '
      '(--config.model.dtype=float32)')
  for k in m:        # MAR's metrics, and another system's loss terms (FlowAR: loss_scale<s>)
    if k in ('loss', 'mse', 'vb', 'grad_norm', 'mask_ratio') or k.startswith('loss_'):
      window.setdefault(k, []).append(m[k])
  return m
