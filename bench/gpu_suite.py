"""One prepared GPU call: every GPU figure the issues ask for, within a device-time budget.

  bash bench/gpu_suite.sh                      # on a lent GPU machine (see docs/benchmarks.md)
  python bench/gpu_suite.py --dry-run --out=outputs/gpu_suite_dry   # CPU check of the wiring

A job is one `disa-bench`-style command (a subprocess with its own timeout) whose JSON result is
collected. Jobs run in priority order; a job whose estimated time no longer fits the remaining
budget is skipped and recorded as such. After every job the suite rewrites (atomically)
`gpu_suite.json` (every job's command, status, seconds and full result) and `gpu_suite.md` (one
Markdown table: images/s per run, speedup vs the job's baseline, fraction of the measured matmul
peak, compile seconds, JAX / PyTorch), so a call cut short still returns what it measured.

`--dry-run` runs every job with the system's `:tiny` config, batch 2 and a few AR / head steps on
whatever backend is present (the CPU here): it checks commands, flags, parsing and the report,
not speed. Jobs of a system whose config file is absent are left out, so the list grows as
systems land (add a `Job` below).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Job:
  """One benchmark command. `runs` is disa-bench's `--runs` (the first run is the baseline)."""

  name: str
  config: str               # config file, relative to the repo
  batch: int                # the paper's batch size for this model
  runs: str
  estimate_s: float         # expected seconds on an H100/H200, compile included
  torch: bool = False       # also time the PyTorch reference (same weights, batch, schedule)
  dtypes: str = 'bfloat16'  # the official samplers run under bf16 autocast
  tiny_runs: str = 'base=mar:4:4,disa=disa:4:4:2:linear'
  extra: tuple = ()         # further flags (full run)
  tiny_extra: tuple = ()    # further flags (dry run)
  system: str = 'mar'       # mar: --runs/--dtypes/--torch; dar, flowar, harmon: their own bench


# MAR: official evaluation is K=64 AR steps, 100 diffusion steps, CFG linear; DiSA 50 -> 5.
# Batches are the official per-GPU evaluation batches (256 for B / L, 128 for H).
_MAR_RUNS = 'mar64=mar:64:100,disa64=disa:64:50:5:linear'
JOBS = [
  Job('MAR-B', 'configs/mar_base.py', 256, _MAR_RUNS, 120, torch=True, dtypes='float32,bfloat16'),
  Job('MAR-L', 'configs/mar_large.py', 256, _MAR_RUNS, 120),
  Job('MAR-H', 'configs/mar_huge.py', 128, _MAR_RUNS, 150),
  Job('MAR-B K=256', 'configs/mar_base.py', 256, 'mar256=mar:256:100,disa64=disa:64:50:5:linear',
      120),
  # Harmon-1.5B (random weights at the real shapes: timing does not depend on them; the spec's
  # default prompt as token ids): baseline 100 steps vs DiSA 100 / 50 / 25 -> 5 in one process
  # (Harmon's own disa-bench comparison; --runs / --dtypes do not apply), phase split included.
  Job('Harmon-1.5B b1', 'configs/harmon/1_5b.py', 1, '', 240, dtypes='float32',
      tiny_runs='', tiny_extra=('--config.sampling.num_iter=2',), system='harmon'),
  Job('Harmon-1.5B b16', 'configs/harmon/1_5b.py', 16, '', 300, dtypes='float32',
      tiny_runs='', system='harmon'),
  # D-AR: official FID sampling is 64 images per GPU, cfg 1.2 -> 8.0 linear, GPT in bf16; runs:
  # the full 256-id decode, early stop after 6 of 8 groups, a 4-step decoder grid.
  Job('D-AR-L', 'configs/dar/l.py', 64, 'full,stop=192,grid=4', 150, system='dar',
      tiny_runs='full,stop=8,grid=2'),
  Job('D-AR-XL', 'configs/dar/xl.py', 64, 'full,stop=192,grid=4', 200, system='dar',
      tiny_runs='full,stop=8,grid=2'),
]
# FlowAR: official eval batch 256 per GPU (512 rows with CFG), fp32; runs = the config's
# baseline (official steps, baseline_cfg) vs DiSA (upper -> lower, cfg), repeats interleaved.
JOBS += [Job(f'FlowAR-{v}', f'configs/flowar/{v.lower()}.py', 256, '', est, dtypes='float32',
             tiny_runs='', system='flowar') for v, est in (('S', 120), ('L', 180), ('H', 300))]
# xAR: official eval batch 256 per GPU (512 rows: both CFG rows always run), fp32; runs = the
# xAR README baseline (B 40, L / H 50 steps per cell) vs DiSA 50 -> 15, repeats interleaved.
JOBS += [Job(f'xAR-{v}', f'configs/xar/{v.lower()}.py', 256, '', est, dtypes='float32',
             tiny_runs='', system='xar',
             tiny_extra=('--config.sampling.baseline_steps=3', '--config.sampling.upper_steps=4',
                         '--config.sampling.lower_steps=3')) for v, est in (('B', 150), ('L', 240), ('H', 360))]


class SuiteError(Exception):
  """A problem with the suite's inputs or environment (one line, exit 2)."""


def command(job: Job, out_json: Path, *, dry_run: bool, devices: int = 1) -> list[str]:
  cfg = job.config + (':tiny' if dry_run else '')
  batch = max(2, devices) if dry_run else job.batch   # the batch is split over the devices
  argv = [sys.executable, '-m', 'disa_jax.cli.bench', f'--config={cfg}', f'--batch_size={batch}',
          f'--json_out={out_json}', '--json']
  runs = job.tiny_runs if dry_run else job.runs
  if runs:
    argv.append(f'--runs={runs}')
  argv += list(job.tiny_extra if dry_run else job.extra)
  if job.system in ('flowar', 'xar'):
    return argv + ['--repeats=1' if dry_run else '--repeats=2', '--phases']
  if job.system != 'mar':
    return argv
  dtypes = 'float32' if dry_run and 'float32' in job.dtypes else job.dtypes
  argv.append(f'--dtypes={dtypes}')
  if job.torch:
    argv.append('--torch')
  return argv


def rows(job: Job, result: dict) -> list[dict]:
  """Flattens one disa-bench result (single- or multi-dtype) into table rows."""
  out = []
  if result.get('system') == 'dar':
    return [{'job': job.name, 'run': r['run'], 'dtype': '-', 'batch': result['batch_size'],
             'K': r['tokens'], 'steps': f'{r["decoder_steps_run"]} decoder',
             'images_per_s': r['images_per_s'], 's_per_image': 1 / r['images_per_s'],
             'speedup': r['speedup'], 'flop_speedup': None, 'mfu': None, 'achieved_tflops': None,
             'compile_s': None, 'torch_s_per_image': None, 'jax_over_torch': None,
             'tokens_per_s': r['tokens_per_s'], 'gpt_s': r['gpt_s'],
             'decoder_s': r['decoder_s'], 'diff_to_full': r['mean_abs_diff_to_full'],
             'device': result['backend']} for r in result['runs']]
  if job.system in ('flowar', 'xar'):     # the same row layout (systems/{flowar,xar}/bench.py)
    for r in result['runs']:
      out.append({
        'job': job.name, 'run': r['label'], 'dtype': 'float32', 'batch': result['batch_size'],
        'K': len(r['steps_requested']), 'steps': '/'.join(map(str, r['steps_requested'])),
        'images_per_s': r['images_per_s'], 's_per_image': r['s_per_image'],
        'speedup': r['speedup'], 'flop_speedup': r['flop_speedup'], 'mfu': None,
        'achieved_tflops': None, 'compile_s': r['compile_s'], 'torch_s_per_image': None,
        'jax_over_torch': None, 'phases': r.get('phases'),
        'device': f'{result["backend"]} {result["device_kind"]}'})
    return out
  for res in result.get('results', [result]):
    for r in res['runs']:
      t = r.get('torch') or {}
      out.append({
        'job': job.name, 'run': r['label'], 'dtype': res['dtype'], 'batch': res['batch_size'],
        'K': r['num_iter'], 'steps': _steps(r), 'images_per_s': r['images_per_s'],
        's_per_image': r['s_per_image'], 'speedup': r['speedup'],
        'flop_speedup': r['flop_speedup'], 'mfu': r['fraction_of_matmul_peak'],
        'achieved_tflops': r['achieved_tflops'], 'compile_s': r['compile_s'],
        'torch_s_per_image': t.get('s_per_image'), 'jax_over_torch': t.get('jax_over_torch'),
        'device': f'{res["backend"]} {res["device_kind"]} x{res["devices"]}',
      })
  return out


def _steps(r: dict) -> str:
  if r['preset'] == 'disa':
    return f'{r["upper_steps"]}->{r["lower_steps"]} {r["strategy"]}'
  return str(r['upper_steps'])


def markdown(report: dict) -> str:
  head = ['job', 'run', 'dtype', 'batch', 'K', 'head steps', 'images/s', 'speedup',
          'FLOP pred.', 'of matmul peak', 'compile s', 'JAX / PyTorch']
  lines = [f'GPU suite ({report["mode"]}): {report["device"]}, total {report["total_s"]:.0f} s '
           f'of a {report["budget_s"]:.0f} s budget', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in report['rows']:
    jt = row['jax_over_torch']
    cells = [row['job'], row['run'], row['dtype'], row['batch'], row['K'], row['steps'],
             f'{row["images_per_s"]:.3g}', f'{row["speedup"]:.2f}x',
             _fmt(row['flop_speedup'], '{:.2f}x'), _fmt(row['mfu'], '{:.0%}'),
             _fmt(row['compile_s'], '{:.1f}'), _fmt(jt, '{:.2f}')]
    lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
  for job in report['jobs']:
    if job['status'] != 'ok':
      lines.append(f'\n{job["name"]}: {job["status"]} {job.get("detail", "")}'.rstrip())
  return '\n'.join(lines) + '\n'


def _fmt(value, spec: str) -> str:
  return '-' if value is None else spec.format(value)


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def _device() -> tuple[str, int]:
  code = ('import jax; d = jax.devices()[0]; '
          'print(jax.default_backend(), d.device_kind, "x%d" % jax.device_count())')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
  if r.returncode:
    raise SuiteError(f'cannot start JAX: {r.stderr.strip().splitlines()[-1:]}')
  text = r.stdout.strip()
  return text, int(text.rsplit('x', 1)[1])


def run_suite(out: Path, *, dry_run: bool, budget_s: float, only: list[str] | None = None,
              log=print) -> dict:
  device, devices = _device()
  if not dry_run and not device.startswith('gpu'):
    raise SuiteError(f'no GPU found (JAX sees {device}); use --dry-run to check the suite on CPU')
  out.mkdir(parents=True, exist_ok=True)
  jobs = [j for j in JOBS if (REPO / j.config).exists() and (not only or j.name in only)]
  if only and not jobs:
    raise SuiteError(f'--only matched no job; jobs: {", ".join(j.name for j in JOBS)}')
  if dry_run:   # one job per config file: the others differ only in sizes
    seen, unique = set(), []
    for j in jobs:
      if j.config not in seen:
        seen.add(j.config)
        unique.append(j)
    jobs = unique
  report = {'mode': 'dry run' if dry_run else 'full', 'device': device, 'budget_s': budget_s,
            'jobs': [], 'rows': [], 'total_s': 0.0}
  t_start = time.perf_counter()
  for job in jobs:
    left = budget_s - (time.perf_counter() - t_start)
    entry = {'name': job.name, 'config': job.config}
    if not dry_run and job.estimate_s > left:
      entry.update(status='skipped', detail=f'(estimated {job.estimate_s:.0f} s > {left:.0f} s left)')
      report['jobs'].append(entry)
      continue
    out_json = out / f'{job.name.replace(" ", "_").replace("=", "")}.json'
    argv = command(job, out_json, dry_run=dry_run, devices=devices)
    entry['command'] = ' '.join(argv[2:])
    log(f'== {job.name}: {entry["command"]}')
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    try:
      r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=max(30.0, left))
      entry['seconds'] = round(time.perf_counter() - t0, 1)
      if r.returncode == 0 and out_json.exists():
        result = json.loads(out_json.read_text())
        entry.update(status='ok', result=result)
        report['rows'] += rows(job, result)
      else:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        entry.update(status=f'failed (exit {r.returncode})', detail=' | '.join(tail))
    except subprocess.TimeoutExpired:
      entry.update(status='timed out', seconds=round(time.perf_counter() - t0, 1))
    log(f'   {entry["status"]} in {entry.get("seconds", 0):.1f} s')
    report['jobs'].append(entry)
    report['total_s'] = round(time.perf_counter() - t_start, 1)
    _write(out / 'gpu_suite.json', json.dumps(report, indent=2, sort_keys=True))
    _write(out / 'gpu_suite.md', markdown(report))
  report['total_s'] = round(time.perf_counter() - t_start, 1)
  _write(out / 'gpu_suite.json', json.dumps(report, indent=2, sort_keys=True))
  _write(out / 'gpu_suite.md', markdown(report))
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', default='outputs/gpu_suite', help='folder for the JSON / Markdown')
  p.add_argument('--dry-run', action='store_true', help='tiny configs on any backend (CPU check)')
  p.add_argument('--budget-s', type=float, default=480.0,
                 help='device seconds for all jobs (default 480 = 8 min)')
  p.add_argument('--only', default='', help='comma-separated job names')
  a = p.parse_args(argv)
  if not a.budget_s > 0:
    print('error: --budget-s must be a positive number of seconds', file=sys.stderr)
    return 2
  try:
    report = run_suite(Path(a.out), dry_run=a.dry_run, budget_s=a.budget_s,
                       only=[s for s in a.only.split(',') if s] or None)
  except SuiteError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(markdown(report))
  return 0 if all(j['status'] in ('ok', 'skipped') for j in report['jobs']) else 1


if __name__ == '__main__':
  sys.exit(main())
