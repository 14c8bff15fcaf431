"""The README's two commands exist and .ci/run runs exactly the README's test command."""

from conftest import REPO


def _commands():
  text = (REPO / 'README.md').read_text()
  blocks = text.split('```bash\n')[1:3]
  return [b.split('\n```')[0].strip() for b in blocks]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
  demo, tests = _commands()
  assert 'disa-demo' in demo and 'pip install' in demo
  assert 'pytest' in tests and 'pip install' in tests
  ci = (REPO / '.ci' / 'run').read_text()
  assert tests in ci.splitlines()
