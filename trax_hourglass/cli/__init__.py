"""Console scripts of trax_hourglass (`trainer`, `hourglass-eval`,
`hourglass-sample`).

A user's error (a bad flag, value, path, a full disk) ends a script with one
line on stderr, `prog: error: <what, which value, what would work>`, and exit
status 1 (2 for a malformed command line); `--debug` (alias `--traceback`) or
TRAX_HOURGLASS_DEBUG=1 shows the traceback instead.
"""

import argparse
import errno
import inspect
import os
import re
import signal
import sys

DEBUG_ENV = 'TRAX_HOURGLASS_DEBUG'


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with its errors in one line (no usage block) and `--debug`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument('--debug', '--traceback', dest='debug',
                      action='store_true',
                      help='show the full traceback of an error (also: '
                           f'{DEBUG_ENV}=1)')

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


# What would work, for the OS errors a user causes.
_OS_HINTS = {
    errno.ENOSPC: 'free disk space, or use another directory',
    errno.EDQUOT: 'free disk space, or use another directory',
    errno.EFBIG: 'free disk space, or raise the file size limit',
    errno.EROFS: 'use a writable directory',
    errno.EACCES: 'use a path you may write to (or read)',
    errno.EPERM: 'use a path you may write to (or read)',
    errno.EISDIR: 'pass a file, not a directory',
    errno.ENOTDIR: 'a part of the path is a file, not a directory',
    errno.ENOENT: 'check the path',
    errno.EEXIST: 'pass another path',
}

# Exceptions that come from what the user gave (or the OS), not from a bug:
# reported in one line. Anything else keeps its traceback.
_USER_ERRORS = (ValueError, KeyError, TypeError, OSError, MemoryError)


def _one_line(e):
  """The exception as one line: its first line, plus gin's configurable."""
  while (isinstance(e, OSError) and e.errno is None and
         isinstance(e.__context__, OSError)):
    e = e.__context__  # gin's copies, which add its context, lose the errno.
  if isinstance(e, OSError) and e.errno in _OS_HINTS and e.strerror:
    where = ' -> '.join(repr(f) for f in (e.filename, e.filename2) if f)
    text = f'{e.strerror}: {where}' if where else e.strerror
    text += f' ({_OS_HINTS[e.errno]})'
  else:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and e.args:
      text = f'missing key {e.args[0]!r}'
    lines = text.splitlines()
    # gin appends "  In call to configurable 'X' (...)" lines.
    configurables = [m.group(1) for line in lines[1:] for m in [
        re.search(r"In call to configurable '([\w.]+)'", line)] if m]
    text = lines[0].strip()
    if configurables and isinstance(e, TypeError):  # Else its text says.
      text += f' (in gin configurable {configurables[0]})'
  if isinstance(e, (TypeError, MemoryError)):
    text = f'{type(e).__name__}: {text}'
  return text


def _is_out_of_memory(e):
  return (type(e).__name__ == 'XlaRuntimeError' and
          'RESOURCE_EXHAUSTED' in str(e))


def wants_traceback(args):
  """Whether the user asked for tracebacks (`--debug` or the environment)."""
  return (getattr(args, 'debug', False) or
          os.environ.get(DEBUG_ENV, '') not in ('', '0'))


def run_command(prog, parse_args, run, argv=None):
  """Runs a console script: a user's error prints one line and exits 1."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  debug = wants_traceback(args)
  try:
    run(args)
  except KeyboardInterrupt:  # Ctrl-C where nothing handles it (the trainer
    if debug:                # saves on it while it trains).
      raise
    print(f'{prog}: stopped by SIGINT (Ctrl-C).', file=sys.stderr, flush=True)
    return 128 + signal.SIGINT
  except Exception as e:  # pylint: disable=broad-except
    if debug or not (isinstance(e, _USER_ERRORS) or _is_out_of_memory(e)):
      raise
    message = _one_line(e)
    if _is_out_of_memory(e):
      message = ('out of accelerator memory: ' +
                 message.split(':', 1)[-1].strip() +
                 ' (use a smaller batch or sequence)')
    print(f'{prog}: error: {message} (--debug shows the traceback)',
          file=sys.stderr, flush=True)
    return 1
  return 0


def check_gin_value_types():
  """Raises ValueError for a gin binding of text where a number is expected.

  gin passes `d_model='abc'` through, and the model then fails deep inside
  with an unrelated message. A parameter whose default is a number or a bool
  and whose binding is a string is refused here, naming the binding.
  """
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  # Every binding, read back from gin's own text of them (its public view).
  statements = config_parser.ConfigParser(
      gin.config_str(), gin_config.ParserDelegate(skip_unknown=True))
  for statement in statements:
    if not isinstance(statement, config_parser.BindingStatement):
      continue
    scope, selector = statement.scope, statement.selector
    name, value = statement.arg_name, statement.value
    try:
      configurable = gin_config.ConfigurableReference(selector,
                                                      False).configurable
      signature = inspect.signature(configurable.wrapped)
    except (KeyError, TypeError, ValueError):
      continue  # Not registered (or ambiguous, which gin itself refuses).
    param = signature.parameters.get(name)
    if param is None or not isinstance(value, str):
      continue
    default = param.default
    if isinstance(default, (bool, int, float)):
      kind = ('true or false' if isinstance(default, bool) else
              'an integer' if isinstance(default, int) else 'a number')
      binding = f'{scope + "/" if scope else ""}{selector}.{name}'
      raise ValueError(f'gin binding {binding}={value!r} is text; it must '
                       f'be {kind} (its default is {default!r}).')


def check_gin_files(paths, label='--config_file'):
  """Refuses, in one line, a gin config that is missing or a directory."""
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f'{label} {path} does not exist')
    if os.path.isdir(path):
      raise ValueError(f'{label} {path} is a directory; pass a gin file (e.g. '
                       "gin/quickstart.gin, or a run's config.gin).")


def parse_gin(config_files, bindings):
  """gin's parse_config_files_and_bindings, its syntax errors in one line.

  `bindings`: (where it came from, e.g. "--config='x.y=1'", binding text).
  A syntax error raises ValueError naming the file (or flag) and line.
  """
  import tokenize  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  sources = [(path, lambda path=path: gin.parse_config_file(path))
             for path in config_files]
  sources += [(where, lambda text=text: gin.parse_config(text))
              for where, text in bindings]
  for where, parse in sources:
    try:
      parse()
    except SyntaxError as e:  # gin's: where, in e.filename, e.lineno.
      raise ValueError(
          f'gin syntax error in {e.filename or where}, line {e.lineno}: '
          f'{e.msg} ({(e.text or "").strip()!r}); gin bindings read '
          "name.parameter = value, e.g. train.steps = 100") from e
    except tokenize.TokenError as e:  # An unclosed bracket or string.
      line = e.args[1][0] if len(e.args) > 1 else '?'
      raise ValueError(
          f'gin syntax error in {where} (or a file it includes), at line '
          f'{line}: {e.args[0]} (an unclosed bracket or string?)') from e
  gin.finalize()
