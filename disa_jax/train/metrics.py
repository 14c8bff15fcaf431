"""Training metrics: JSON lines + TensorBoard event files + a periodic console report.

Only process 0 writes. `metrics.jsonl` has one object per report ({"step": s, "loss": ...});
TensorBoard scalars go to `<workdir>/tensorboard` (tensorboardX, which needs no TensorFlow,
imported lazily so sampling never loads it). On resume, lines logged after the restored
checkpoint are dropped so the file describes one consistent run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class MetricWriter:
  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / 'metrics.jsonl'
    self._tb = None
    # opened at the first write, after `truncate_after` purged the events of an interrupted
    # stretch; the pid suffix keeps a restarted run from reusing an event file's name
    self._tb_dir = Path(workdir) / 'tensorboard' if enabled and tensorboard else None

  def truncate_after(self, step: int) -> None:
    """Drops lines (and TensorBoard events) with step > `step`: they belong to an
    interrupted stretch of the run."""
    if not self.enabled:
      return
    if self._tb_dir is not None:
      from disa_jax.integrity import purge_event_files

      self.close()
      purge_event_files(self._tb_dir, step)
    if not self.path.exists():
      return
    keep = [ln for ln in self.path.read_text().splitlines()
            if ln.strip() and _step_of(ln) <= step]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(ln + '\n' for ln in keep))
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, sort_keys=True) + '\n')
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self._tb_dir), flush_secs=30,
                               filename_suffix=f'.{os.getpid()}')
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f'train/{k}', float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _step_of(line: str) -> float:
  """The step of a metrics line; a line cut short by a kill counts as after every step."""
  try:
    return json.loads(line).get('step', 0)
  except ValueError:
    return float('inf')


class Report:
  """steps/s over the last reporting window and an ETA."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.t0, self.s0 = time.perf_counter(), start_step

  def line(self, step: int, scalars: dict) -> str:
    now = time.perf_counter()
    rate = (step - self.s0) / max(now - self.t0, 1e-9)
    self.t0, self.s0 = now, step
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    parts = [f'step {step}/{self.total}', f'loss {scalars["loss"]:.4f}',
             *(f'{k} {scalars[k]:.4f}' for k in ('mse', 'vb') if k in scalars),
             f'lr {scalars["lr"]:.2e}', f'{rate:.2f} steps/s', f'eta {_fmt(eta)}']
    return '  '.join(parts)


def _fmt(seconds: float) -> str:
  if seconds == float('inf'):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def parameter_overview(params) -> str:
  """A table of parameter names, shapes, dtypes and sizes (clu.parameter_overview), printed
  when training starts. Works on abstract (shape-only) parameter trees."""
  import jax
  from clu import parameter_overview as po
  from flax import nnx

  tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return po.get_parameter_overview(tree, include_stats=False)
