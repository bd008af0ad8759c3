"""The gin surface and the layering: what `import trax_hourglass` brings."""

import ast
import glob
import os
import subprocess
import sys

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'trax_hourglass')
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, 'gin', '*.gin')))


def _python(code, timeout=300):
  """Runs `code` in a fresh interpreter (this checkout first on the path)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  return subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


_PARSE = '''
import sys
import gin
for path in sys.argv[1:]:
  gin.clear_config()
  gin.parse_config_file(path, skip_unknown=False)
  print('parsed', path)
'''


def _parse_in_fresh_process(paths):
  result = _python(_PARSE.replace('sys.argv[1:]', repr(list(paths))))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('parsed') == len(paths)


def test_gin_files_parse_in_a_process_that_imports_only_gin():
  # The first file is parsed before anything but gin is imported; the others
  # after it, each on a cleared config (each file's own imports are checked
  # below, and one process per file in the slow test).
  assert len(GIN_FILES) >= 15
  quickstart = os.path.join(ROOT, 'gin', 'quickstart.gin')
  _parse_in_fresh_process(
      [quickstart] + [p for p in GIN_FILES if p != quickstart])


@pytest.mark.parametrize('path', GIN_FILES, ids=os.path.basename)
def test_each_gin_file_imports_what_it_names_first(path):
  with open(path) as f:
    parser = gin.config_parser.ConfigParser(f, gin.config.ParserDelegate())
    first = next(iter(parser))
  assert isinstance(first, gin.config_parser.ImportStatement), first
  assert first.module == 'trax_hourglass'  # Before trax: it fixes trax first.


@pytest.mark.slow
@pytest.mark.parametrize('path', GIN_FILES, ids=os.path.basename)
def test_each_gin_file_parses_alone(path):
  _parse_in_fresh_process([path])


def _imported_modules(path):
  """Absolute names of the modules a source file imports (any depth)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def test_nothing_below_the_cli_imports_the_cli():
  below = [p for p in glob.glob(os.path.join(PACKAGE, '**', '*.py'),
                                recursive=True)
           if os.path.join(PACKAGE, 'cli') not in p]
  assert len(below) > 10
  offenders = {os.path.relpath(p, ROOT): sorted(
      m for m in _imported_modules(p)
      if m == 'trax_hourglass.cli' or m.startswith('trax_hourglass.cli.'))
               for p in below}
  assert not {p: m for p, m in offenders.items() if m}


def test_importing_the_package_registers_every_configurable():
  result = _python(
      'import gin, trax_hourglass\n'
      "for name in ('ProgressReporter', 'final_sample', 'HourglassLM',\n"
      "             'enwik8_inputs', 'byte_file_inputs', 'stdlib_text_inputs',\n"
      "             'npz_image_inputs', 'tfds_image_inputs', 'wiki40b_inputs'):\n"
      "  gin.config._REGISTRY.get_match('trax_hourglass.' + name).wrapper\n"
      "print('registered')\n")
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'registered' in result.stdout
