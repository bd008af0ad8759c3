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


# The model sections of trax's five hourglass_*.gin files, in their style
# (bare `@LinearPooling`, ...), smaller; `{model}` is `HourglassLM` there.
_SIZES = """
{model}.d_model = 32
{model}.d_ff = 64
{model}.n_heads = 2
{model}.dropout = 0.0
{model}.vocab_size = 256
{model}.mode = 'train'
{model}.ff_activation = @trax.layers.FastGelu
"""
TRAX_STYLE = {
    'enwik8': ("{model}.vanilla_layers = (2, 2)\n{model}.hierarchy = '3@3'\n"
               '{model}.attention_upsampling_fn = @NaiveUpsampling\n',
               {'Repeat'}),
    'cifar10': ("{model}.vanilla_layers = (1, 1)\n{model}.hierarchy = '2@3'\n"
                '{model}.attention_downsampling_fn = @LinearPooling\n'
                '{model}.attention_upsampling_fn = @LinearUpsampling\n',
                {'Shorten', 'ProlongBack'}),
    'imagenet32': ("{model}.vanilla_layers = (1, 1)\n"
                   "{model}.hierarchy = '3@3'\n"
                   '{model}.attention_downsampling_fn = @LinearPooling\n',
                   {'Shorten'}),
    'imagenet64': ("{model}.vanilla_layers = (1, 1)\n"
                   "{model}.hierarchy = '2@3'\n"
                   '{model}.downsampling_fn = @LinearPooling\n'
                   '{model}.upsampling_fn = @LinearUpsampling\n',
                   {'Shorten', 'ProlongBack'}),
    'wiki40b': ("{model}.vanilla_layers = (1, 1)\n{model}.hierarchy = '2@4'\n"
                '{model}.attention_upsampling_fn = @LinearUpsampling\n',
                {'ProlongBack'}),
}


def _layer_names(layer):
  names = {layer.name}
  for sublayer in layer.sublayers:
    names |= _layer_names(sublayer)
  return names


def _build(name, section):
  """The model that gin text `section` configures as `name`, and its size."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin.parse_config(f'train.model = @{name}\n' +
                     (_SIZES + section).format(model=name))
    model = gin.query_parameter('train.model').scoped_configurable_fn()
    weights, _ = model.weights_and_state_signature(
        shapes.ShapeDtype((1, 96), np.int32))
  finally:
    gin.clear_config()
  return model, sum(int(np.prod(w.shape)) for w in
                    fastmath.tree_flatten(weights) if hasattr(w, 'shape'))


# cifar10's section names trax's Shorten and ProlongBack, enwik8's Repeat:
# every layer the others name; those three run with -m slow.
@pytest.mark.parametrize('config', [
    c if c in ('cifar10', 'enwik8') else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(TRAX_STYLE)])
def test_a_trax_hourglass_gin_builds_ours_after_the_one_rename(config):
  import trax_hourglass  # pylint: disable=g-import-not-at-top,unused-import
  section, trax_layer_names = TRAX_STYLE[config]
  # `HourglassLM` -> `trax_hourglass.HourglassLM`, as the README says; the
  # same text as trax's model (fully named: both are registered here).
  ours, n_ours = _build('trax_hourglass.HourglassLM', section)
  theirs, n_theirs = _build('trax.models.HourglassLM', section)
  assert n_ours == n_theirs
  # trax's model keeps trax's resampling layers; ours builds its own.
  assert trax_layer_names <= _layer_names(theirs)
  assert not trax_layer_names & _layer_names(ours)
