"""Benchmark library behind `disa-bench`: timed sampling runs, FLOPs, peaks, precision.

All runs of one benchmark use the same model weights, batch, labels and seed, in one
process, so ratios between runs (and against the PyTorch reference) are measured side by side.
Compilation happens before the timed repeats and is reported per bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from disa_jax.engine.runner import generate_checked
from disa_jax.schedules import RunSpec  # noqa: F401  (re-exported: the --runs syntax)
from disa_jax.systems.mar.flops import plan_flops
from disa_jax.systems.mar.plan import mask_schedule


def _sig(x: float, digits: int = 4) -> float:
  """Rounded to significant digits (tiny CPU configs have tiny FLOP counts)."""
  return float(f'{x:.{digits}g}')


def matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
  """Measured dense matmul throughput (FLOP/s) of the default device for `dtype`.

  n x n @ n x n with float32 accumulation; n defaults to 2048 on CPU, 8192 elsewhere.
  """
  n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def with_dtype(model, dtype: str):
  """The same parameters in a model whose compute dtype is `dtype` (params stay fp32)."""
  from disa_jax.systems.mar.model import MAR, MARConfig

  if model.config.dtype == dtype:
    return model
  cfg = MARConfig.from_dict({**model.config.to_dict(), 'dtype': dtype})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def precision_report(model_ref, model_test, *, batch_size: int = 4, seed: int = 0) -> dict:
  """Relative errors of one AR step's backbone output z and head output (test vs ref model),
  on the same realistic input (half the tokens known, the rest masked)."""
  c = model_ref.config
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.standard_normal((batch_size, c.seq_len, c.token_embed_dim)),
                       jnp.float32)
  mask = np.zeros((batch_size, c.seq_len), np.float32)
  for b in range(batch_size):
    mask[b, rng.permutation(c.seq_len)[: c.seq_len // 2]] = 1
  labels = jnp.arange(batch_size) % c.class_num
  out = {}

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.abs(b).max() > 0:
      return None  # e.g. the head of an untrained model (official zero init): no signal
    return float(np.abs(a - b).max() / np.abs(b).max())

  def backbone(m, tok, msk, lab):
    return m.forward_mae_decoder(m.forward_mae_encoder(tok, msk, m.class_embedding(lab)), msk)

  zs = [jax.jit(backbone)(m, tokens, jnp.asarray(mask), labels)
        for m in (model_ref, model_test)]
  out['backbone_z_max_rel_error'] = rel(zs[1], zs[0])
  x = jnp.asarray(rng.standard_normal((batch_size * 4, c.token_embed_dim)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch_size * 4))
  z = zs[0][:, :4].reshape(batch_size * 4, -1)
  heads = [jax.jit(lambda m, x, t, z: m.diffloss.net(x, t, z))(m, x, t, z)
           for m in (model_ref, model_test)]
  ch = c.token_embed_dim
  out['head_eps_max_rel_error'] = rel(heads[1][:, :ch], heads[0][:, :ch])
  out['head_v_max_rel_error'] = rel(heads[1][:, ch:], heads[0][:, ch:])
  return out


def run_benchmark(model, source: str, specs: list[RunSpec], *, sampler_factory: Callable,
                  batch_size: int, cfg: float, cfg_schedule: str, temperature: float,
                  repeats: int = 1, phases: bool = False, calibrate: bool = False,
                  decoder=None, torch_threads: int = 0, with_torch: bool = False, quality=None,
                  seed: int = 0, log=print) -> dict:
  """Runs every spec on `model` (same batch/labels/seed); returns the result dict.

  `phases` adds a synchronised backbone / head timing pass to every run, `calibrate` to the
  baseline only; either enables the calibrated FLOP prediction (see `calibrated_prediction`).
  """
  plans = [s.step_plan() for s in specs]
  for s in specs:
    mask_schedule(s.num_iter, model.config.seq_len)
  sampler = sampler_factory(model)
  labels = np.arange(batch_size) % model.config.class_num
  key = jax.random.key(seed)
  dtype = model.config.dtype
  peak = matmul_peak(jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32)
  result = {
    'model': source, 'batch_size': batch_size, 'cfg': cfg, 'cfg_schedule': cfg_schedule,
    'temperature': temperature, 'dtype': dtype, 'backend': jax.default_backend(),
    'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
    'matmul_peak_tflops': _sig(peak / 1e12), 'repeats': repeats, 'runs': [],
  }
  torch_model = _torch_model(model, torch_threads) if with_torch else None
  for i, (spec, sp) in enumerate(zip(specs, plans, strict=True)):
    kw = dict(steps=sp.steps, max_timestep=sp.max_timestep, cfg=cfg, cfg_schedule=cfg_schedule,
              temperature=temperature)
    plan = sampler.plan(batch_size, steps=sp.steps, max_timestep=sp.max_timestep, cfg=cfg,
                        cfg_schedule=cfg_schedule)
    log(f'[{spec.label}] compiling {len(plan.backbone_buckets)} backbone + '
        f'{len(plan.head_buckets)} head buckets ...')
    before = dict(sampler.compile_log)
    compile_s = sampler.compile(plan)
    per_bucket = {_bucket_name(k): round(v, 3) for k, v in sampler.compile_log.items()
                  if k not in before}
    log(f'[{spec.label}] compiled in {compile_s:.1f} s')
    walls, tokens = [], None
    for r in range(repeats):
      tokens = generate_checked(sampler, labels, key, **kw)   # timing: last_stats.wall_s
      walls.append(sampler.last_stats.wall_s)
      log(f'[{spec.label}] run {r + 1}/{repeats}: {walls[-1]:.2f} s')
    wall = min(walls)
    official = plan_flops(model.config, plan, official=True)
    executed = plan_flops(model.config, plan, official=False)
    achieved = executed['total'] * batch_size / wall
    row = {
      'label': spec.label, 'preset': spec.preset, 'num_iter': spec.num_iter,
      'strategy': spec.strategy, 'upper_steps': spec.upper, 'lower_steps': spec.lower,
      'max_timestep': sp.max_timestep,
      'wall_s': round(wall, 4), 'wall_s_all': [round(w, 4) for w in walls],
      's_per_image': round(wall / batch_size, 4), 'images_per_s': round(batch_size / wall, 5),
      'compile_s': round(compile_s, 3), 'compile_s_per_bucket': per_bucket,
      'compilations': {'backbone': len(plan.backbone_buckets), 'head': len(plan.head_buckets)},
      'head_token_steps_per_image': plan.head_token_steps(),
      'head_token_steps_per_image_padded': plan.head_token_steps(padded=True),
      'head_padding_waste': round(plan.head_waste(), 4),
      'encoder_padding_waste': round(plan.encoder_waste(), 4),
      'tflop_per_image': {k: _sig(v / 1e12) for k, v in official.items()},
      'tflop_per_image_executed': {k: _sig(v / 1e12) for k, v in executed.items()},
      'achieved_tflops': _sig(achieved / 1e12),
      'fraction_of_matmul_peak': _sig(achieved / peak),
    }
    if phases or (calibrate and i == 0):
      sampler.generate(labels, key, timed=True, **kw)
      st = sampler.last_stats
      ph = {'backbone_s': round(st.backbone_s, 3), 'head_s': round(st.head_s, 3)}
      ph['backbone_tflops'] = _sig(executed['backbone'] * batch_size / st.backbone_s / 1e12)
      ph['head_tflops'] = _sig(executed['head'] * batch_size / st.head_s / 1e12)
      if decoder is not None:
        decoder.decode(tokens)                          # compile
        t0 = time.perf_counter()
        decoder.decode(tokens)
        ph['decode_s'] = round(time.perf_counter() - t0, 3)
      ph.update({f'{k[:-2]}_s_per_image': round(v / batch_size, 4) for k, v in ph.items()
                 if k.endswith('_s')})
      row['phases'] = ph
      log(f'[{spec.label}] phases: ' + ', '.join(f'{k} {v}' for k, v in ph.items()))
    if quality is not None and decoder is not None:
      row['quality'] = quality.evaluate(decoder.decode(tokens), labels)
    if torch_model is not None:
      row['torch'] = _torch_run(torch_model, labels, spec, sp, cfg, cfg_schedule, temperature,
                                batch_size, seed)
      row['torch']['jax_over_torch'] = round(wall / row['torch']['wall_s'], 4)
      log(f'[{spec.label}] torch reference: {row["torch"]["wall_s"]:.2f} s '
          f'(jax/torch = {row["torch"]["jax_over_torch"]:.3f})')
    result['runs'].append(row)
  base = result['runs'][0]
  for row in result['runs']:
    row['speedup'] = round(base['wall_s'] / row['wall_s'], 4)
    row['flop_speedup'] = round(base['tflop_per_image']['total'] / row['tflop_per_image']['total'],
                                4)
    row['speedup_over_flop_prediction'] = round(row['speedup'] / row['flop_speedup'], 4)
    if 'torch' in row and 'torch' in base:
      row['torch']['speedup'] = round(base['torch']['wall_s'] / row['torch']['wall_s'], 4)
  calibrated_prediction(result)
  return result


def calibrated_prediction(result: dict) -> None:
  """Adds the speedup predicted by a FLOP model with one cost per FLOP for each component.

  A plain FLOP ratio assumes a head FLOP costs what a backbone FLOP costs; on small batches
  the head's matmuls are far less efficient, so removing head steps saves more time than its
  FLOP share. The baseline's phase pass gives its backbone / head split; each run is then
  predicted as base_wall x (f_bb F_bb / F_bb,base + f_head F_head / F_head,base) with its
  executed FLOPs. A run slower than this prediction carries overhead the FLOPs do not explain
  (bucket dispatch, padding, recompiles).
  """
  base = result['runs'][0]
  ph = base.get('phases')
  if not ph or not ph['backbone_s'] + ph['head_s']:
    return
  f_bb = ph['backbone_s'] / (ph['backbone_s'] + ph['head_s'])
  fb = base['tflop_per_image_executed']
  for row in result['runs']:
    fr = row['tflop_per_image_executed']
    rel = f_bb * fr['backbone'] / fb['backbone'] + (1 - f_bb) * fr['head'] / fb['head']
    row['predicted_s_per_image'] = round(base['s_per_image'] * rel, 4)
    row['calibrated_flop_speedup'] = round(1 / rel, 4)
    row['speedup_over_calibrated_prediction'] = round(row['speedup'] * rel, 4)
  result['calibration'] = {'run': base['label'], 'backbone_fraction': round(f_bb, 4)}


def _bucket_name(key) -> str:
  name, static = key[0], dict(key[2])
  if name == 'backbone':
    return f'backbone/V{static["visible_pad"]}'
  if name.startswith('head'):
    return f'{name}/A{static["num_steps"]}n{static["n_pad"]}'
  return name


def torch_reference():
  """The PyTorch MAR reference (`reference/mar.py` of a repository checkout, not installed)."""
  import importlib

  from disa_jax.errors import UserError

  try:
    return importlib.import_module('reference.mar')
  except ModuleNotFoundError as e:
    missing = e.name or ''
    if missing.startswith('torch'):
      raise UserError('--torch needs PyTorch: pip install torch==2.13.0') from None
    raise UserError('--torch needs the PyTorch reference reference/mar.py of a repository '
                    'checkout: run disa-bench from the repository root (or put it on '
                    'PYTHONPATH)') from None


def _torch_model(model, threads: int):
  import torch

  from disa_jax.convert.mapping import flax_state_to_torch

  TorchMAR = torch_reference().TorchMAR

  if threads:
    torch.set_num_threads(threads)
  tm = TorchMAR(model.config).eval()
  sd = flax_state_to_torch(nnx.state(model, nnx.Param))
  tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
  return tm


def _torch_run(tm, labels, spec, sp, cfg, cfg_schedule, temperature, batch_size, seed):
  import torch

  sample_tokens = torch_reference().sample_tokens

  np.random.seed(seed)
  torch.manual_seed(seed)
  timings = {}
  t0 = time.perf_counter()
  sample_tokens(tm, batch_size, num_iter=spec.num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                labels=labels, temperature=temperature, steps=list(sp.steps),
                clip=sp.max_timestep, timings=timings)
  wall = time.perf_counter() - t0
  return {'wall_s': round(wall, 4), 's_per_image': round(wall / batch_size, 4),
          'backbone_s': round(timings.get('backbone', 0.0), 3),
          'head_s': round(timings.get('head', 0.0), 3), 'threads': torch.get_num_threads()}


def format_table(result: dict) -> str:
  """A fixed-width table of the runs of one `run_benchmark` result."""
  header = ['run', 'K', 'steps', 's/img', 'img/s', 'head tok-steps', 'compiles b/h',
            'pad waste h/e', 'TFLOP/s', 'speedup', 'FLOP pred.']
  has_cal = 'calibration' in result
  if has_cal:
    header += ['calibrated pred.']
  has_torch = any('torch' in r for r in result['runs'])
  if has_torch:
    header += ['torch s/img', 'jax/torch']
  rows = []
  for r in result['runs']:
    steps = f'{r["preset"]} {r["upper_steps"]}' + (
      f'->{r["lower_steps"]} {r["strategy"]}' if r['preset'] == 'disa' else '')
    cells = [r['label'], r['num_iter'], steps, f'{r["s_per_image"]:.3f}',
             f'{r["images_per_s"]:.4f}', r['head_token_steps_per_image'],
             f'{r["compilations"]["backbone"]}/{r["compilations"]["head"]}',
             f'{r["head_padding_waste"]:.1%}/{r["encoder_padding_waste"]:.1%}',
             f'{r["achieved_tflops"]:.3f}', f'{r["speedup"]:.2f}x', f'{r["flop_speedup"]:.2f}x']
    if has_cal:
      cells += [f'{r["calibrated_flop_speedup"]:.2f}x']
    if has_torch:
      t = r.get('torch', {})
      cells += [f'{t["s_per_image"]:.3f}' if t else '-',
                f'{t["jax_over_torch"]:.3f}' if t else '-']
    rows.append([str(c) for c in cells])
  widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
  line = lambda cells: '  '.join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa
  title = (f'{result.get("config", "")} | {result["model"]} | batch {result["batch_size"]} | '
           f'{result["dtype"]} | cfg {result["cfg"]} {result["cfg_schedule"]} | '
           f'{result["backend"]} x{result["devices"]} ({result["device_kind"]}), matmul peak '
           f'{result["matmul_peak_tflops"]:.3f} TFLOP/s')
  return '\n'.join([title, line(header), *map(line, rows)])
