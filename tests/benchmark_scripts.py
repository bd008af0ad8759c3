"""Loading and reading the benchmark scripts of `benchmarks/` in tests."""

import importlib.util
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, 'benchmarks')


def path(name):
  """benchmarks/<name>.py, to run as a user would."""
  return os.path.join(BENCHMARKS, name + '.py')


def _on_path():
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)  # The scripts do `import harness`.


def load(name):
  """Imports benchmarks/<name>.py (benchmarks/ is not a package); no trax."""
  _on_path()
  spec = importlib.util.spec_from_file_location(name, path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def harness():
  """The scripts' shared plumbing, the package benchmarks/harness; no trax."""
  _on_path()
  return importlib.import_module('harness')


def table_rows(stdout, first_header):
  """Markdown table rows of a benchmark's output, as {first cell: [cells]}."""
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('| ') and cells[0] not in (first_header, ':---',
                                                  '---:'):
      rows[cells[0]] = cells
  return rows
