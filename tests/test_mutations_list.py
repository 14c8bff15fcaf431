"""The mutation list (`tools/mutations.py`) cannot rot: every planted bug still applies to the
code it names, names its tests, and the list stays at a useful size."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_mutation_applies():
  r = subprocess.run([sys.executable, str(REPO / 'tools' / 'mutation_test.py'), '--check'],
                     capture_output=True, text=True, cwd=REPO, timeout=120)
  assert r.returncode == 0, r.stderr
  count = int(r.stdout.split()[0])
  assert count >= 30, r.stdout


def test_every_system_brings_mutations():
  sys.path.insert(0, str(REPO / 'tools'))
  from mutations import MUTATIONS

  areas = {m.name.split('.')[0] for m in MUTATIONS}
  assert {'mar', 'ddpm', 'schedules', 'convert', 'metrics', 'train', 'flowar', 'dar',
          'harmon', 'xar'} <= areas, sorted(areas)
  assert all(m.tests and m.why for m in MUTATIONS)
