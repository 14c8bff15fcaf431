"""The resumable work directory of an evaluation (`disa-eval`, shared by the systems' own eval
commands): work happens in `<out>.partial/`, whose `run.json` fingerprints the settings; a run
continued with other settings is refused naming each difference (`--overwrite` discards it);
files a killed process was writing (`*.tmp*`) are removed before continuing. The caller
renames `<out>.partial` to `<out>` when every batch is done (docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
import shutil

from disa_jax import integrity
from disa_jax.errors import UserError
from disa_jax.io.output import write_json


def prepare_workdir(final: str, partial: str, fp: dict, overwrite: bool) -> bool:
  """Creates or validates `partial`; returns True when continuing an earlier run."""
  import jax

  if os.path.exists(final) and not overwrite:
    raise UserError(f'output {final} already exists; pass --overwrite or choose another --out')
  run_json = os.path.join(partial, 'run.json')
  old = None
  if os.path.exists(partial) and not overwrite and os.path.exists(run_json):
    try:      # run.json is written atomically: unreadable means damaged, never half-written
      old = integrity.read_json(run_json, what='run fingerprint')
    except integrity.InvalidFileError as e:
      raise UserError(f'{e}; pass --overwrite to discard the interrupted run in '
                      f'{partial}') from None
  if old is not None:
    if old != json.loads(json.dumps(fp)):
      diff = integrity.fingerprint_diff(old, json.loads(json.dumps(fp)))
      raise UserError(
        f'{partial} holds an interrupted run with other settings ({"; ".join(diff)}); run '
        'the original command with the original files to continue it, or pass --overwrite to '
        'discard it')
    for sub in ('images', 'shards'):          # files a killed process was writing
      d = os.path.join(partial, sub)
      for name in os.listdir(d) if os.path.isdir(d) else ():
        if '.tmp' in name:
          os.remove(os.path.join(d, name))
    return True
  if jax.process_index() == 0:
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    write_json(run_json, fp)
  barrier('prepared', final)
  return False


def barrier(name: str, final: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'disa_eval:{name}:{final}')
