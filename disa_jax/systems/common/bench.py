"""Benchmark pieces FlowAR and xAR share (`systems/flowar/bench.py`, `systems/xar/bench.py`).

Reference benchmark (random weights with official shapes, JAX vs the PyTorch reference):
- `torch_reference`: imports torch and the reference class from the repo root's `reference/`
  (a one-line UserError when either is missing).
- `compare_with_reference`: every schedule compiled and run once (first-call seconds), then
  `repeats` timed runs interleaved across schedules (min kept, seconds per image), then the
  PyTorch runs and the max relative difference of the outputs; DiSA / baseline speedups measured
  and predicted by the FLOP model.
- `reference_parser` / `run_reference_main`: the argparse entry (`--variant --batch --repeats`,
  the system's own flags, `--no-torch --json`); one JSON object on stdout, `error:` + exit 2.

Engine benchmark (`disa-bench`): `time_interleaved` (timed repeats interleaved across runs, the
min wall kept: side by side on a noisy host), `add_speedups`, `fixed_width_table`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import numpy as np

from disa_jax.errors import UserError


def torch_reference(module: str, name: str):
  """(torch, the reference class `name` of `reference/<module>.py`)."""
  try:
    import torch

    cls = getattr(importlib.import_module(f'reference.{module}'), name)
  except ImportError as e:
    raise UserError(f'the PyTorch comparison needs torch and the repo root on sys.path ({e}); '
                    'run from the repository root or pass --no-torch') from None
  return torch, cls


def _log(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def compare_with_reference(result: dict, schedules: dict, *, sample, run_fields, batch: int,
                           repeats: int, compile_count, torch_sample=None,
                           paper_speedup=None) -> dict:
  """Fills `result` (with a 'runs' dict) for the 'baseline' and 'disa' `schedules`.

  sample(name, steps) -> JAX output (blocked until ready); run_fields(steps) -> the run's
  FLOP-model fields ('tflop_per_image' and the system's own); compile_count() -> the sampler's
  compile count; torch_sample(name, steps) -> the reference's output as numpy, or None to skip.
  """
  outs, times = {}, {name: [] for name in schedules}
  for name, steps in schedules.items():          # first calls: compile + one run
    t0 = time.perf_counter()
    sample(name, steps)
    first = time.perf_counter() - t0
    _log(f'jax {name}: first call {first:.1f} s')
    result['runs'][name] = {'steps': steps, 'jax_first_call_s': first, **run_fields(steps)}
  for _ in range(repeats):                       # timed runs, schedules interleaved
    for name, steps in schedules.items():
      t0 = time.perf_counter()
      outs[name] = np.asarray(sample(name, steps))
      times[name].append(time.perf_counter() - t0)
      _log(f'jax {name}: {times[name][-1]:.1f} s')
  for name in schedules:
    result['runs'][name]['jax_s_per_image'] = min(times[name]) / batch
  result['compile_count'] = compile_count()
  if torch_sample is not None:
    for name, steps in schedules.items():
      t_times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = torch_sample(name, steps)
        t_times.append(time.perf_counter() - t0)
      _log(f'torch {name}: {min(t_times):.1f} s')
      r = result['runs'][name]
      r['torch_s_per_image'] = min(t_times) / batch
      r['jax_over_torch_time'] = r['jax_s_per_image'] / r['torch_s_per_image']
      r['max_rel_diff_jax_vs_torch'] = float(np.abs(outs[name] - out).max()
                                             / np.abs(out).max())
  b, d = result['runs']['baseline'], result['runs']['disa']
  result['speedup_measured'] = b['jax_s_per_image'] / d['jax_s_per_image']
  result['speedup_flop_model'] = b['tflop_per_image'] / d['tflop_per_image']
  result['speedup_paper_readme'] = paper_speedup
  if torch_sample is not None:
    result['speedup_measured_torch'] = b['torch_s_per_image'] / d['torch_s_per_image']
  return result


def reference_parser(description: str, *, default_variant: str, variant_help: str):
  """The parser of a reference benchmark with `--variant --batch --repeats` (add your own flags,
  then call `run_reference_main`)."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument('--variant', default=default_variant, help=variant_help)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--repeats', type=int, default=1)
  return p


def run_reference_main(parser, argv, run) -> int:
  """Adds `--no-torch --json`, parses `argv`, prints `run(args)` as JSON (and writes it to
  `--json`); a UserError is one `error:` line and exit status 2."""
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference runs')
  parser.add_argument('--json', default='', help='also write the result to this file')
  a = parser.parse_args(argv)
  try:
    res = run(a)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(res, indent=2)
  print(text)
  if a.json:
    with open(a.json, 'w') as f:
      f.write(text + '\n')
  return 0


def time_interleaved(rows: list[dict], generate, *, repeats: int, batch_size: int, log) -> None:
  """`repeats` timed runs of every row, interleaved (side by side on a noisy host): generate(i)
  runs row i and returns its wall seconds; each row gets the min as wall_s, s_per_image,
  images_per_s."""
  walls = [[] for _ in rows]
  for r in range(repeats):
    for i, row in enumerate(rows):
      walls[i].append(generate(i))
      log(f'[{row["label"]}] run {r + 1}/{repeats}: {walls[i][-1]:.3f} s')
  for row, w in zip(rows, walls, strict=True):
    wall = min(w)
    row.update(wall_s=round(wall, 4), s_per_image=round(wall / batch_size, 5),
               images_per_s=round(batch_size / wall, 4))


def add_speedups(rows: list[dict], tflop) -> None:
  """Each row's measured speedup over the first row and the FLOP model's (tflop(row))."""
  base = rows[0]
  for row in rows:
    row['speedup'] = round(base['wall_s'] / row['wall_s'], 4)
    row['flop_speedup'] = round(tflop(base) / tflop(row), 4)


def fixed_width_table(title: str, header: list[str], rows: list[list]) -> str:
  """`title`, then the header and rows right-aligned in columns two spaces apart."""
  rows = [[str(c) for c in cells] for cells in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

  def line(cells):
    return '  '.join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

  return '\n'.join([title, line(header), *map(line, rows)])
