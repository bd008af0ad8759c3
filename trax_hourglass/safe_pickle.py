"""Reading trax checkpoint files without executing code from them.

A pickle can run arbitrary code when loaded; trax's checkpoints only ever hold
numpy arrays, trax `ShapeDtype`s and plain containers, so the unpickler admits
exactly those types and refuses anything else, naming the file.
"""

import gzip
import io
import pickle
import zlib

import numpy as np

# (module, name) pairs that trax checkpoints contain.
_ALLOWED = {
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('trax.shapes', 'ShapeDtype'),
    # A pickled jax array: rebuilt from a numpy array, itself checked here.
    ('jax._src.array', '_reconstruct_array'),
    ('collections', 'OrderedDict'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
    ('builtins', 'complex'),
    ('builtins', 'slice'),
}
_ALLOWED_MODULE_PREFIXES = ('numpy.dtypes',)  # e.g. numpy.dtypes.Float32DType


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, truncated or holds forbidden objects."""


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _ALLOWED or module.startswith(_ALLOWED_MODULE_PREFIXES):
      return super().find_class(module, name)
    raise CheckpointError(
        f'{self._path}: refusing to load {module}.{name}; a trax checkpoint '
        'holds only arrays, shapes and plain containers, so this file was '
        'not written by trax (or was tampered with).')


def loads(data, path='<bytes>'):
  """Unpickles `data` admitting only what trax checkpoints contain."""
  try:
    return _RestrictedUnpickler(io.BytesIO(data), path).load()
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'{path}: not a readable checkpoint pickle ({type(e).__name__}: {e}); '
        'it may be truncated or corrupted.') from e


def _read_gzip(path):
  try:
    with open(path, 'rb') as f, gzip.GzipFile(fileobj=f) as g:
      return g.read()
  except FileNotFoundError:
    raise
  except (OSError, EOFError, zlib.error) as e:
    raise CheckpointError(
        f'{path}: not a complete gzip file ({e}); it may be truncated.') from e


def load_gzip(path):
  """Loads a gzipped pickle such as trax's `model.pkl.gz`, safely."""
  return loads(_read_gzip(path), path)


def load_npy_gzip(path):
  """Loads the arrays of a trax `*.npy.gz` file (no pickles allowed in it)."""
  data = io.BytesIO(_read_gzip(path))
  arrays = []
  while data.tell() < len(data.getbuffer()):
    try:
      arrays.append(np.load(data, allow_pickle=False))
    except ValueError as e:
      raise CheckpointError(
          f'{path}: array {len(arrays)} is unreadable ({e}); the file may be '
          'truncated or corrupted.') from e
  return arrays
