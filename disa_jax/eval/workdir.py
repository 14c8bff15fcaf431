"""The resumable work directory of an evaluation (`disa-eval`, shared by the systems' own eval
commands): work happens in `<out>.partial/`, whose `run.json` fingerprints the settings; a run
continued with other settings is refused naming each difference (`--overwrite` discards it);
files a killed process was writing (`*.tmp*`) are removed before continuing. The caller
renames `<out>.partial` to `<out>` when every batch is done (docs/evaluation.md).
"""

from __future__ import annotations

from disa_jax.io import output


def prepare_workdir(final: str, partial: str, fp: dict, overwrite: bool) -> bool:
  """Creates or validates `partial`; returns True when continuing an earlier run
  (`disa_jax.io.output.ResumableDir.prepare`, the one implementation)."""
  return output.prepare_workdir(final, partial, fp, overwrite)


def barrier(name: str, final: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'disa_eval:{name}:{final}')
