"""pytest plugin of `tools/tolerance_margins.py`: records how close each tolerance check came.

Loaded with `-p margins_plugin` (tools/ on PYTHONPATH) and `DISA_MARGINS_OUT=<file.jsonl>`.
Two kinds of check are recorded, one JSON line per call:

- `max_rel_error(a, b)` (tests/helpers.py and the per-system helpers): the value, and the bound
  of the comparison that follows the call in the source (`< 1e-5`, `<= TOL`, `< h.TOL`; names
  resolve in the caller's locals, then globals). `>` comparisons (tests that two results differ) are recorded as well.
- `np.testing.assert_allclose`: max |a - b| / (atol + rtol |b|), which fails above 1.

Nothing is changed about what the tests assert: the wrappers return the original values.
"""

from __future__ import annotations

import json
import linecache
import os
import re
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / 'tests'
_COMPARE = re.compile(r'\s*\)?\s*(<=|<|>=|>)\s*([A-Za-z_][A-Za-z_0-9.]*|[0-9.]+(?:e-?[0-9]+)?)')


def _record(kind: str, value: float, op: str | None, bound: float | None, frame) -> None:
  site = f'{Path(frame.f_code.co_filename).name}:{frame.f_lineno}'
  test = os.environ.get('PYTEST_CURRENT_TEST', '?').rsplit(' ', 1)[0]
  with open(os.environ['DISA_MARGINS_OUT'], 'a') as f:
    f.write(json.dumps(dict(test=test, site=site, kind=kind, value=value, op=op,
                            bound=bound)) + '\n')


def _bound_after_call(frame) -> tuple[str | None, float | None]:
  """The comparison written right after the call being made in `frame`, if any."""
  positions = list(frame.f_code.co_positions())
  i = frame.f_lasti // 2                     # one entry per 2-byte code unit (caches included)
  if not 0 <= i < len(positions):
    return None, None
  _, end_line, _, end_col = positions[i]
  if end_line is None or end_col is None:
    return None, None
  line = linecache.getline(frame.f_code.co_filename, end_line)
  m = _COMPARE.match(line[end_col:])
  if not m:
    return None, None
  op, text = m.groups()
  try:
    return op, float(text)
  except ValueError:
    head, *attrs = text.split('.')                      # `TOL` or `helpers.TOKEN_PARITY_TOL`
    val = frame.f_locals.get(head, frame.f_globals.get(head))
    for a in attrs:
      val = getattr(val, a, None)
    return (op, float(val)) if isinstance(val, (int, float)) else (None, None)


def _wrap_max_rel_error(orig):
  if getattr(orig, '_margins_wrapped', False):
    return orig

  def max_rel_error(a, b):
    value = orig(a, b)
    frame = sys._getframe(1)
    op, bound = _bound_after_call(frame)
    _record('max_rel_error', float(value), op, bound, frame)
    return value

  max_rel_error._margins_wrapped = True
  return max_rel_error


_orig_allclose = np.testing.assert_allclose


def _assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
  try:
    a = np.asarray(actual, np.float64)
    d = np.asarray(desired, np.float64)
    err = np.abs(a - d)
    ratio = float(np.max(err / np.maximum(atol + rtol * np.abs(d), 1e-300))) if a.size else 0.0
    if np.isfinite(ratio):
      _record('assert_allclose', ratio, '<=', 1.0, sys._getframe(1))
  except (TypeError, ValueError):      # shapes that do not broadcast: the real call reports it
    pass
  return _orig_allclose(actual, desired, rtol, atol, *args, **kwargs)


def pytest_configure(config):
  """Patch only in a recording run (importing this module changes nothing)."""
  del config
  if os.environ.get('DISA_MARGINS_OUT'):
    np.testing.assert_allclose = _assert_allclose


def pytest_collection_modifyitems(session, config, items):
  """After collection every test module is imported: re-point each `max_rel_error` that a
  module under tests/ defines or imported."""
  del session, config, items
  if not os.environ.get('DISA_MARGINS_OUT'):
    return
  for mod in list(sys.modules.values()):
    f = getattr(mod, '__file__', None)
    if not f or not Path(f).resolve().is_relative_to(TESTS):
      continue
    fn = getattr(mod, 'max_rel_error', None)
    if callable(fn):
      mod.max_rel_error = _wrap_max_rel_error(fn)
