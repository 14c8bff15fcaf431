"""How close each numeric tolerance check of the test suite came to failing.

  python tools/tolerance_margins.py                          # default suite, 25 tightest checks
  python tools/tolerance_margins.py -k parity --top=50 -- tests/test_sampler.py
  python tools/tolerance_margins.py --json=margins.json --fail-above=0.8 -- -m '' tests/harmon

Runs pytest (the default command's `-n 2` unless `--serial`) with `tools/margins_plugin.py`,
which records every `max_rel_error` comparison and `np.testing.assert_allclose` call, and
prints the checks sorted by use of their tolerance: value / bound for `<` and `<=` checks
(fails at 1), bound / value for `>` checks (tests that two results differ; fails at 1).
A check above ~0.5 passes here but may fail on a CPU whose matmul blocking differs, or for a
different noise draw: docs/testing.md ("Tolerance margins") says how the suite's tight
checks were measured over seeds and what they were set to. Extra arguments after `--` go to
pytest unchanged. Exit status: pytest's, or 3 when `--fail-above` is exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_of_tolerance(row: dict) -> float | None:
  """Fraction of the tolerance used (>= 1 fails), or None when no bound was found."""
  op, bound, value = row['op'], row['bound'], row['value']
  if op is None or bound is None:
    return None
  num, den = (value, bound) if op in ('<', '<=') else (bound, value)
  return num / den if den > 0 else (0.0 if num <= 0 else float('inf'))


def summarize(rows: list[dict]) -> list[dict]:
  """The largest use per (test, site); checks without a bound are kept with use None."""
  best: dict[tuple[str, str], dict] = {}
  for r in rows:
    r = {**r, 'use': use_of_tolerance(r)}
    key = (r['test'], r['site'])
    if key not in best or _rank(r) > _rank(best[key]):
      best[key] = r
  return sorted(best.values(), key=_rank, reverse=True)


def _rank(row: dict) -> float:
  return -1.0 if row['use'] is None else row['use']


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--top', type=int, default=25, help='rows to print (default 25)')
  ap.add_argument('--json', help='write every summarized check here')
  ap.add_argument('--fail-above', type=float, help='exit 3 if any check uses more than this')
  ap.add_argument('--serial', action='store_true', help='run pytest without -n 2')
  ap.add_argument('-k', help='pytest -k expression')
  args, pytest_args = ap.parse_known_args(argv)
  pytest_args = [a for a in pytest_args if a != '--']
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / 'margins.jsonl'
    out.touch()
    env = {**os.environ, 'DISA_MARGINS_OUT': str(out),
           'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO / 'tools'),
                                                       os.environ.get('PYTHONPATH')]))}
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'margins_plugin', '-p', 'no:cacheprovider']
    cmd += [] if args.serial else ['-n', '2']
    cmd += ['-k', args.k] if args.k else []
    rc = subprocess.call(cmd + pytest_args, cwd=REPO, env=env)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line]
  table = summarize(rows)
  bounded = [r for r in table if r['use'] is not None]
  print(f'\n{len(rows)} checks recorded, {len(table)} distinct (test, site); '
        f'{len(table) - len(bounded)} without a readable bound')
  print(f'{"use":>7}  {"value":>9}  {"op":<2} {"bound":>8}  site  test')
  for r in bounded[:args.top]:
    print(f'{r["use"]:7.3f}  {r["value"]:9.3g}  {r["op"]:<2} {r["bound"]:8.3g}  '
          f'{r["site"]}  {r["test"].split("::", 1)[-1]}')
  loose = [r for r in table if r['use'] is None]
  if loose:
    print('\nlargest values without a bound at the call (the caller compares them):')
    for r in sorted(loose, key=lambda r: -r['value'])[:min(args.top, 10)]:
      print(f'{"":7}  {r["value"]:9.3g}  {"":11}  {r["site"]}  {r["test"].split("::", 1)[-1]}')
  if args.json:                        # written whole, then renamed: never half a file
    tmp_json = Path(f'{args.json}.tmp-{os.getpid()}')
    tmp_json.write_text(json.dumps(table, indent=1) + '\n')
    os.replace(tmp_json, args.json)
  if rc == 0 and args.fail_above is not None and any(r['use'] > args.fail_above
                                                     for r in bounded):
    print(f'tolerance_margins: a check uses more than {args.fail_above} of its tolerance')
    return 3
  return rc


if __name__ == '__main__':
  sys.exit(main())
