"""Mutation testing: plant realistic one-line bugs one at a time and check the tests catch them.

  python tools/mutation_test.py               # every mutation: apply, run its tests, revert
  python tools/mutation_test.py --check       # only check every mutation still applies (fast)
  python tools/mutation_test.py --baseline    # the named tests pass on the unmutated code
  python tools/mutation_test.py --only=mar.head.cfg_mix,schedules.linear_round --json=out.json

Each `Mutation` names a file, one exact snippet that must occur exactly once in it, the
replacement, and the tests expected to kill it (fail with the bug planted). The file is
restored after each run, also on Ctrl-C. The kill rate (killed / run) is printed at the end;
the project keeps it at or above 95 % (docs/testing.md). The list lives in
`tools/mutations.py`; each system adds mutations of its sampler, schedule, converter and model.
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
sys.path.insert(0, str(REPO / 'tools'))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str                  # '<area>.<what>'
  path: str                  # file relative to the repo
  find: str                  # exact snippet, must occur exactly once
  replace: str
  tests: tuple[str, ...]     # pytest node ids / files expected to kill it
  why: str = ''              # the realistic bug it stands for


class MutationError(Exception):
  pass


def check(m: Mutation) -> str:
  path = REPO / m.path
  if not path.exists():
    raise MutationError(f'{m.name}: {m.path} does not exist')
  text = path.read_text()
  n = text.count(m.find)
  if n != 1:
    raise MutationError(f'{m.name}: snippet occurs {n} times in {m.path} (must be exactly 1)')
  if m.find == m.replace:
    raise MutationError(f'{m.name}: replacement equals the snippet')
  for t in m.tests:
    if not (REPO / t.split('::')[0]).exists():
      raise MutationError(f'{m.name}: test file {t} does not exist')
  return text


def run_one(m: Mutation, *, timeout: float, python: str) -> dict:
  text = check(m)
  path = REPO / m.path
  t0 = time.perf_counter()
  try:
    path.write_text(text.replace(m.find, m.replace))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [python, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-m', '',
           '-W', 'ignore', *m.tests]
    try:
      r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
      rc = r.returncode
      status = 'killed' if rc == 1 else 'survived' if rc == 0 else f'error (exit {rc})'
      tail = (r.stdout.strip().splitlines() or [''])[-1]
    except subprocess.TimeoutExpired:
      status, tail = 'killed (timeout)', ''
  finally:
    path.write_text(text)
  return {'name': m.name, 'path': m.path, 'status': status, 'tests': list(m.tests),
          'seconds': round(time.perf_counter() - t0, 1), 'summary': tail}


def main(argv=None) -> int:
  from mutations import MUTATIONS

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--check', action='store_true', help='only check that every mutation applies')
  p.add_argument('--only', default='', help='comma-separated mutation names (or name prefixes)')
  p.add_argument('--baseline', action='store_true',
                 help='run every named test once on the unmutated code (must pass; a kill '
                      'only counts when its tests pass without the bug)')
  p.add_argument('--timeout', type=float, default=900.0, help='seconds per mutation run')
  p.add_argument('--json', default='', help='write the results here')
  a = p.parse_args(argv)
  names = [s for s in a.only.split(',') if s]
  muts = [m for m in MUTATIONS if not names or any(m.name.startswith(n) for n in names)]
  if not muts:
    print('error: --only matched no mutation', file=sys.stderr)
    return 2
  dup = {m.name for m in MUTATIONS if [x.name for x in MUTATIONS].count(m.name) > 1}
  if dup:
    print(f'error: duplicate mutation names: {sorted(dup)}', file=sys.stderr)
    return 2
  try:
    for m in muts:
      check(m)
  except MutationError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if a.check:
    print(f'{len(muts)} mutations apply cleanly')
    return 0
  if a.baseline:
    tests = list(dict.fromkeys(t for m in muts for t in m.tests))
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', '', '-W',
           'ignore', *tests]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(f'baseline over {len(tests)} test selections: {"pass" if r.returncode == 0 else "FAIL"}')
    return r.returncode
  results = []
  for i, m in enumerate(muts):
    res = run_one(m, timeout=a.timeout, python=sys.executable)
    results.append(res)
    print(f'[{i + 1}/{len(muts)}] {res["status"]:<16} {m.name}  ({res["seconds"]} s)', flush=True)
  killed = sum(r['status'].startswith('killed') for r in results)
  errors = [r for r in results if r['status'].startswith('error')]
  rate = killed / len(results)
  print(f'\nkill rate: {killed}/{len(results)} = {rate:.1%}')
  for r in results:
    if not r['status'].startswith('killed'):
      print(f'  {r["status"]}: {r["name"]} ({r["path"]}) -- tests {", ".join(r["tests"])}')
  if a.json:
    Path(a.json).write_text(json.dumps({'kill_rate': rate, 'killed': killed,
                                        'total': len(results), 'results': results}, indent=2))
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
