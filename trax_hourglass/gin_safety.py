"""A run's gin config read as data: nothing in it can run code.

A run's config.gin can be written by anyone who can write its directory;
`parse_config_safely` lets it bind only the configurables of a model, its
data and training (`_PARTS`, `_SETTINGS`) and import only `_IMPORTS`, and
reads an `include` only beside the including file.
"""

import os
import tokenize

import gin
from gin import config as gin_config
from gin import config_parser

from trax_hourglass import files as hg_files


# A run's gin config is data: it may name the configurables of a model and
# its data, which building and scoring it call, by module ...
_PARTS = ('trax_hourglass', 'trax.layers', 'trax.models', 'trax.optimizers',
          'trax.supervised.lr_schedules', 'trax.data')
# ... and bind the parameters of the training it records (trax writes every
# configurable a run called into its config.gin); no value may refer to these.
_SETTINGS = ('trax.supervised.trainer_lib.train',
             'trax.supervised.trainer_lib.num_devices',
             'trax.supervised.training.TrainTask',
             'trax.supervised.training.EvalTask',
             'trax.fastmath.ops.backend',
             'trax.data.debug_data_pipeline.debug_pipeline')
# The modules it may import (they register the configurables above).
_IMPORTS = ('trax_hourglass', 'trax')
_MAX_CONFIG_BYTES = 1 << 24
_MAX_INCLUDE_DEPTH = 8


class UnsafeConfigError(ValueError):
  """A gin config names something a run's config must not (it could run code)."""


def _refuse(path, location, what):
  line = location.line_num if location is not None else '?'
  raise UnsafeConfigError(
      f'{path}:{line}: {what}, refused: a run\'s gin config is data, it may '
      'bind only the configurables of a model, its data and training '
      f'({", ".join(_PARTS)}; trax\'s train settings) and import only '
      'trax_hourglass. Nothing was run; remove the line, or pass the model\'s '
      'gin config (e.g. from gin/) with --config_file.')


def _in(module, prefixes):
  return module is not None and any(
      module == p or module.startswith(p + '.') for p in prefixes)


def _configurable(selector, path, location):
  """The registered configurable `selector` (partial) names, or None."""
  try:
    return gin_config.ConfigurableReference(selector, False).configurable
  except KeyError as e:  # Ambiguous.
    _refuse(path, location, f'{selector} is ambiguous ({e})')
  except ValueError:  # Not registered: another program's.
    return None


class _CheckingDelegate(gin_config.ParserDelegate):
  """gin's parser delegate, refusing a reference (`@name`, `@name()`) to
  anything but a part of a model or its data (`_PARTS`)."""

  def __init__(self, path):
    super().__init__(skip_unknown=True)
    self._path = path
    self.parser = None  # Set once the parser is made.

  def configurable_reference(self, scoped_selector, evaluate):
    location = self.parser._current_location()  # pylint: disable=protected-access
    selector = scoped_selector.rsplit('/', 1)[-1]
    found = _configurable(selector, self._path, location)
    if found is None or not _in(found.module, _PARTS):
      what = (found.selector if found is not None else
              f'{selector} (no such configurable)')
      _refuse(self._path, location, f'refers to @{what}')
    return super().configurable_reference(scoped_selector, evaluate)


def _read_config_text(path):
  try:
    data = hg_files.read_bounded(path, _MAX_CONFIG_BYTES)
  except hg_files.NotRegularFileError as e:
    raise ValueError(f'gin config {e}; pass a gin file.') from None
  if len(data) > _MAX_CONFIG_BYTES:
    raise ValueError(f'gin config {path} has over {_MAX_CONFIG_BYTES:,} '
                     'bytes; it is not a gin config.')
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'gin config {path} is not UTF-8 text ({e})') from None


def _included_path(path, filename):
  """Where an `include` of `filename` in config `path` points: beside `path`,
  else from the folder above (the repository's variants name their base as
  'gin/enwik8_hourglass.gin', which gin finds from the repository's root)."""
  here = os.path.dirname(os.path.realpath(path))
  for folder in (here, os.path.dirname(here)):
    candidate = os.path.realpath(os.path.join(folder, filename))
    if os.path.exists(candidate):
      return candidate
  return os.path.realpath(os.path.join(here, filename))


def _checked_parts(path, root, depth=0):
  """[(text, path)] of gin config `path` in order, each text free of
  `include`s (the files they name, inside `root`, checked and in their place)
  and checked: only `_PARTS` and `_SETTINGS`, only `_IMPORTS`."""
  text = _read_config_text(path)
  lines = [line + '\n' for line in text.split('\n')]  # As gin counts them.
  delegate = _CheckingDelegate(path)
  try:
    parser = config_parser.ConfigParser(text, delegate)
    delegate.parser = parser
    statements = list(parser)
  except UnsafeConfigError as e:  # Without the lines gin adds.
    raise UnsafeConfigError(str(e).splitlines()[0]) from None
  except SyntaxError as e:
    raise ValueError(f'{path}:{e.lineno}: gin syntax error: {e.msg} '
                     f'({(e.text or "").strip()!r})') from None
  except tokenize.TokenError as e:
    raise ValueError(f'{path}:{e.args[1][0]}: gin syntax error: '
                     f'{e.args[0]} (an unclosed bracket?)') from None
  parts, start = [], 0
  for statement in statements:
    location = statement.location
    if isinstance(statement, config_parser.ImportStatement):
      if statement.is_from or not _in(statement.module, _IMPORTS):
        _refuse(path, location, repr(statement.format()))
    elif isinstance(statement, config_parser.IncludeStatement):
      if depth >= _MAX_INCLUDE_DEPTH:
        _refuse(path, location, 'includes files more than '
                f'{_MAX_INCLUDE_DEPTH} deep (a cycle?)')
      real = _included_path(path, statement.filename)
      if os.path.commonpath([real, root]) != root:
        _refuse(path, location, f'includes {statement.filename}, outside '
                f'{root}')
      if statement.filename not in location.line_content:
        _refuse(path, location, 'an include must be written on one line')
      line = location.line_num  # 1-based: its text ends before this line.
      parts.append(('\n' * start + ''.join(lines[start:line - 1]), path))
      parts.extend(_checked_parts(real, root, depth + 1))
      start = line
    elif isinstance(statement, (config_parser.BindingStatement,
                                config_parser.BlockDeclaration)):
      if getattr(statement, 'arg_name', None) == '':
        continue  # A macro: its value was checked while parsed.
      found = _configurable(statement.selector, path, location)
      if found is not None and not (_in(found.module, _PARTS) or
                                    found.selector in _SETTINGS):
        _refuse(path, location, f'binds {found.selector}')
    else:
      _refuse(path, location, f'{type(statement).__name__} is not a binding')
  parts.append(('\n' * start + ''.join(lines[start:]), path))
  return parts


def parse_config_safely(config_files, bindings=(), finalize=False):
  """Parses gin config files as data, then `bindings` (a user's own).

  A run's config.gin can be written by anyone who can write its directory:
  unlike `gin.parse_config_files_and_bindings`, nothing in `config_files` can
  run code. Each is read once, bounded, and may only bind the configurables of
  models, their data and training and import trax_hourglass; an `include` is
  read (and checked) only inside the including file's directory. Anything
  else is UnsafeConfigError naming the file and line; unknown configurables
  are skipped (another program's).
  """
  for path in config_files:
    path = os.fspath(path)
    root = os.path.realpath(os.path.dirname(path) or '.')
    for text, where in _checked_parts(path, root):
      try:
        gin.parse_config(text, skip_unknown=True)
      except SyntaxError as e:
        raise ValueError(f'{where}:{e.lineno}: gin syntax error: '
                         f'{e.msg}') from None
  gin.parse_config(list(bindings), skip_unknown=True)
  if finalize:
    gin.finalize()
