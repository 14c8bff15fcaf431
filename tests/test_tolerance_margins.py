"""tools/tolerance_margins.py: the bound of each check is read from the source after the call,
and a recording run reports the real values of the suite's checks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'tools'))

import margins_plugin  # noqa: E402
import tolerance_margins  # noqa: E402

TOL = 3e-4


SEEN = []


def probe(*_):
  """Stands in for max_rel_error: records the bound written after this call, returns 0."""
  SEEN.append(margins_plugin._bound_after_call(sys._getframe(1)))
  return 0.0


def test_bound_is_read_after_the_call():
  SEEN.clear()
  assert probe(1,
               2) <= TOL                          # a module global; the call spans two lines
  assert probe(1) < 1e-3 and not probe(2) > 2e-2
  x = probe(0)                                    # no comparison follows
  assert x == 0.0 and not probe(0) == 1.0         # `==` is not a tolerance check
  assert probe(0) < np.pi                         # a dotted name
  assert SEEN == [('<=', TOL), ('<', 1e-3), ('>', 2e-2), (None, None), (None, None),
                  ('<', np.pi)]


def test_use_of_tolerance_both_directions():
  use = tolerance_margins.use_of_tolerance
  assert np.isclose(use(dict(op='<', bound=1e-5, value=4e-6)), 0.4)
  assert use(dict(op='>', bound=1e-2, value=4e-2)) == 0.25     # a "results differ" check
  assert use(dict(op=None, bound=None, value=1.0)) is None
  assert use(dict(op='<=', bound=0.0, value=0.0)) == 0.0       # `<= 0` met exactly
  assert use(dict(op='<=', bound=0.0, value=1e-9)) == float('inf')
  rows = [dict(test='t', site='a:1', op='<', bound=1.0, value=v) for v in (0.2, 0.7, 0.5)]
  assert [r['use'] for r in tolerance_margins.summarize(rows)] == [0.7]
  zero_then_none = [dict(test='t', site='b:2', op='<', bound=1.0, value=0.0),
                    dict(test='t', site='b:2', op=None, bound=None, value=3.0)]
  assert [r['use'] for r in tolerance_margins.summarize(zero_then_none)] == [0.0]


def test_recording_run_reports_the_golden_head_checks(tmp_path):
  out = tmp_path / 'm.json'
  r = subprocess.run([sys.executable, 'tools/tolerance_margins.py', '--serial', f'--json={out}',
                      '-k', 'plain', '--', 'tests/test_official_golden.py'],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  rows = json.loads(out.read_text())
  golden = [x for x in rows if x['site'].startswith('test_official_golden.py:')]
  assert golden and all(x['op'] == '<' and x['bound'] == 1e-5 for x in golden)
  assert all(0 < x['use'] < 1 for x in golden)                 # real errors, bound read
  assert np.isclose(golden[0]['use'], golden[0]['value'] / 1e-5)
  assert 'use' in r.stdout and 'test_official_golden.py:' in r.stdout


def test_importing_the_plugin_patches_nothing():
  assert np.testing.assert_allclose is margins_plugin._orig_allclose
