"""Importing trax for trax_hourglass: fast, safely, with what jax changed.

Importing `trax_hourglass` calls `apply_jax_shims()` before anything else
imports trax: it refuses (in one line) a machine without a temporary directory,
makes trax's import fast (`_fix_assert_shape_stack`), imports trax and applies
the jax shims a model needs (`jax_shims`, each only where the installed jax
needs it). trax's training machinery stays as trax ships it until training
installs its fixes (`trax_fixes.install_training_fixes`, called by
`trax_hourglass.train` and `trax_hourglass.Loop`); `apply()` does both, for a
program that trains with trax's own Loop. Each fix has a test in
`tests/test_compat.py` that fails without it.
"""

import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import types

_APPLIED = False  # apply(): the shims and the training fixes.
_SHIMMED = False  # apply_jax_shims(): what `import trax_hourglass` does.
_ASSERT_SHAPE = 'trax.layers.assert_shape'


def _fast_stack(context=1):
  """`inspect.stack()` without reading source files or scanning `sys.modules`."""
  del context  # Callers in trax only read the frame itself.
  frames = []
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename,
                                    frame.f_lineno, frame.f_code.co_name,
                                    None, None))
    frame = frame.f_back
  return frames


def _fast_getframeinfo(frame, context=1):
  """`inspect.getframeinfo()` of a frame without its source (no code_context)."""
  if not inspect.isframe(frame):
    return inspect.getframeinfo(frame, context)
  return inspect.Traceback(frame.f_code.co_filename, frame.f_lineno,
                           frame.f_code.co_name, None, None)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Runs `patch(module)` as soon as module `name` has executed, once."""

  def __init__(self, name, patch):
    self._name, self._patch = name, patch

  def find_spec(self, fullname, path, target=None):
    if fullname != self._name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
    if spec is None or spec.loader is None:
      return None  # Let the other finders import it, unpatched.
    exec_module, patch = spec.loader.exec_module, self._patch

    def exec_and_patch(module):
      exec_module(module)
      patch(module)

    spec.loader.exec_module = exec_and_patch
    return spec


def _fix_assert_shape_stack():
  # trax's @assert_shape runs inspect.getframeinfo(inspect.stack()[1][0]) per
  # decorated layer; both resolve modules via inspect.getmodule, which scans all of
  # (tensorflow-sized) sys.modules per frame: `import trax` took ~25 s. Give that
  # module, as soon as it exists, an `inspect` that only reads frames. Can go
  # once trax's assert_shape stops calling them per layer (1.4.1 does).
  proxy = types.ModuleType('inspect')
  proxy.__dict__.update(inspect.__dict__)
  proxy.stack = _fast_stack
  proxy.getframeinfo = _fast_getframeinfo

  def patch(module):
    module.inspect = proxy

  if _ASSERT_SHAPE in sys.modules:  # trax was imported before us: too late for import.
    patch(sys.modules[_ASSERT_SHAPE])
  else:
    sys.meta_path.insert(0, _AfterImport(_ASSERT_SHAPE, patch))


def multiprocess_cpu_training_hangs():
  """Whether several CPU devices per process can deadlock multi-process runs.

  With jax 0.10.2 (whose pmap is jit-based) a 2-process x 2-CPU-device trainer
  hangs after a few steps, at random: one local device's part of a
  cross-process all-reduce waits on that device's in-flight-computations
  semaphore in XLA's CPU client while the other part waits in gloo. jax 0.4.38
  (C++ pmap) trains; the pmap kind tells the two runtimes apart.
  """
  from trax_hourglass import jax_shims  # pylint: disable=g-import-not-at-top
  return jax_shims.pmap_is_jit_based()


# The console scripts, by the module `python -m` runs.
_PROGS = {'trax_hourglass.cli.trainer': 'trainer',
          'trax_hourglass.cli.evaluate': 'hourglass-eval',
          'trax_hourglass.cli.sample': 'hourglass-sample'}


class NoTemporaryDirectoryError(OSError):
  """No writable temporary directory: trax's imports cannot start."""


def _check_temporary_directory():
  """Refuses, in one line, to import trax without a usable temporary directory.

  TensorFlow (which trax imports) asks for one at import time (absl's test
  directory), before any script's error handling runs: a full or unwritable
  /tmp ended in a 40-frame traceback. A script (`trainer`, ...) prints
  `prog: error: ...` instead; a library import raises the error.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    tempfile.gettempdir()
    return
  except FileNotFoundError as e:
    error = NoTemporaryDirectoryError(
        f'no usable temporary directory ({e.strerror or e}: every one tried '
        'is full or not writable); free disk space there, or set TMPDIR to '
        'a writable directory')
  argv = list(getattr(sys, 'orig_argv', sys.argv))
  prog = (_PROGS.get(argv[argv.index('-m') + 1], None)
          if '-m' in argv[:-1] else os.path.basename(sys.argv[0] or ''))
  debug = ({'--debug', '--traceback'} & set(argv) or
           os.environ.get('TRAX_HOURGLASS_DEBUG', '') not in ('', '0'))
  if prog in _PROGS.values() and not debug:
    def one_line(kind, value, tb):
      if kind is not NoTemporaryDirectoryError:
        return sys.__excepthook__(kind, value, tb)
      print(f'{prog}: error: {value} (--debug shows the traceback)',
            file=sys.stderr, flush=True)
    sys.excepthook = one_line
  raise error


def apply_jax_shims():
  """Imports trax (fast) and applies the jax shims a model needs, once.

  What `import trax_hourglass` does; trax's training machinery stays as trax
  ships it (training installs `trax_fixes`).
  """
  global _SHIMMED
  if _SHIMMED:
    return
  _fix_assert_shape_stack()  # Before `import trax`, which decorates its layers.
  _check_temporary_directory()
  import trax  # pylint: disable=g-import-not-at-top,unused-import
  import trax.layers  # pylint: disable=g-import-not-at-top,unused-import
  import trax.supervised  # pylint: disable=g-import-not-at-top,unused-import
  from trax_hourglass import jax_shims  # pylint: disable=g-import-not-at-top
  jax_shims.apply()
  _SHIMMED = True


def apply():
  """Imports trax (fast) and applies every fix, once.

  The jax shims (`apply_jax_shims`) and trax's training fixes
  (`trax_fixes.install_training_fixes`, which refuses a trax other than
  1.4.1): for a program that trains with trax's own Loop.
  """
  global _APPLIED
  if _APPLIED:
    return
  apply_jax_shims()
  from trax_hourglass import trax_fixes  # pylint: disable=g-import-not-at-top
  trax_fixes.install_training_fixes()
  _APPLIED = True
