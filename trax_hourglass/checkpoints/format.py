"""trax's checkpoint file format, read without executing code, and written.

trax 1.4.1 saves a `Loop` as `model.pkl.gz` (a gzipped pickle with the step,
state, history and input signature), `model.weights.npy.gz` and
`model.opt_slotsN.npy.gz` (arrays written one after another by `np.save` into
one gzip stream; bfloat16 ones as uint16 bits) and `data_counters0.pkl`.

Loading never executes code from a file: `SafeUnpickler` admits only what
trax writes (numpy arrays, dtypes and scalars, jax arrays read back as numpy,
`ShapeDtype`, builtin and `collections` containers, numbers); `.npy.gz` files
are read with `allow_pickle=False`; a truncated or corrupt file or anything
else raises `CheckpointError` naming the file.
"""

import collections
import gzip
import io
import os
import pickle

import jax
import numpy as np
from numpy._core import multiarray as _np_multiarray
from numpy._core import numeric as _np_numeric
from trax import shapes

from trax_hourglass import files as hg_files


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, modified or holds forbidden data."""


class NonFiniteWeightsError(ValueError):
  """Weights hold NaN or infinity: the run diverged."""


def _numpy_from_jax_pickle(fun, args, arr_state, aval_state):
  """Stands in for `jax._src.array._reconstruct_array`; returns a numpy array.

  trax pickles jax arrays (state, history values); jax's reconstructor would
  call `fun` and put the result on a device. Here `fun` must be numpy's own
  array reconstructor, and the value stays a host numpy array.
  """
  del aval_state  # Only weak_type: meaningless for a numpy array.
  if fun not in (_np_reconstruct,):
    raise pickle.UnpicklingError(
        f'a jax array in a checkpoint must be rebuilt by numpy, not {fun!r}')
  value = fun(*args)
  value.__setstate__(arr_state)
  return value


_np_reconstruct = _np_multiarray._reconstruct  # pylint: disable=protected-access

_SAFE_GLOBALS = {
    ('builtins', 'list'): list,
    ('builtins', 'tuple'): tuple,
    ('builtins', 'dict'): dict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('builtins', 'bytearray'): bytearray,
    ('collections', 'defaultdict'): collections.defaultdict,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    # numpy 1 wrote `numpy.core`, numpy 2 writes `numpy._core`.
    ('numpy.core.multiarray', '_reconstruct'): _np_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _np_reconstruct,
    ('numpy.core.multiarray', 'scalar'): _np_multiarray.scalar,
    ('numpy._core.multiarray', 'scalar'): _np_multiarray.scalar,
    ('numpy.core.numeric', '_frombuffer'): _np_numeric._frombuffer,  # pylint: disable=protected-access
    ('numpy._core.numeric', '_frombuffer'): _np_numeric._frombuffer,  # pylint: disable=protected-access
    ('jax._src.array', '_reconstruct_array'): _numpy_from_jax_pickle,
    ('trax.shapes', 'ShapeDtype'): shapes.ShapeDtype,
}


class SafeUnpickler(pickle.Unpickler):
  """An Unpickler that admits only the types trax puts in its checkpoints."""

  def __init__(self, file, path='<checkpoint>'):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    fn = _SAFE_GLOBALS.get((module, name))
    if fn is None and module == 'numpy.dtypes' and name.endswith('DType'):
      fn = getattr(np.dtypes, name, None)  # numpy 2 dtype classes.
    if fn is None:
      raise CheckpointError(
          f'{self._path}: refusing to load {module}.{name} from a checkpoint '
          'pickle; trax checkpoints hold only numpy arrays, numbers, strings, '
          'lists, tuples, dicts and trax ShapeDtypes, so this file was not '
          'written by trax (corrupt or tampered with). Not loading it.')
    return fn

  def persistent_load(self, pid):
    raise CheckpointError(f'{self._path}: checkpoint pickles have no '
                          f'persistent ids, found {pid!r}; not loading it.')


def _open_checkpoint_file(path):
  """`open(path, 'rb')` of a regular file: a FIFO or device is refused
  (NotRegularFileError), never read (it could hang or never end)."""
  return os.fdopen(hg_files.open_regular(path), 'rb')


def safe_unpickle(path, compressed=True):
  """Reads a pickle written by trax (gzipped: `*.pkl.gz`) without running code.

  Returns containers, numbers, strings and numpy arrays; raises CheckpointError
  naming `path` when it is truncated, corrupt or holds anything else.
  """
  try:
    with _open_checkpoint_file(path) as f:
      data = f.read()
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint file is missing') from None
  except hg_files.NotRegularFileError as e:
    raise CheckpointError(f'{e}; not reading it as a checkpoint') from None
  except OSError as e:
    raise CheckpointError(
        f'{path}: truncated or corrupt checkpoint file ({e})') from e
  return _safe_loads(data, path, compressed)


def _safe_loads(data, path, compressed):
  """`safe_unpickle` of the bytes `data` read from `path`."""
  try:
    if compressed:
      data = gzip.decompress(data)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise CheckpointError(
        f'{path}: truncated or corrupt checkpoint file ({e})') from e
  try:
    return SafeUnpickler(io.BytesIO(data), path=path).load()
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A truncated pickle fails in many ways (EOFError, UnpicklingError,
    # ValueError, IndexError...); all mean the same here.
    raise CheckpointError(
        f'{path}: truncated or corrupt checkpoint pickle '
        f'({type(e).__name__}: {e})') from e


def unpickle_from_file(file_path, gzip=False):  # pylint: disable=redefined-outer-name
  """trax's `training.unpickle_from_file`, reading safely (any filesystem).

  trax's old `Trainer` (`trainer_lib.load_trainer_state`) and its Loop loader
  of non-local checkpoints read pickles through this function.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    with tf.io.gfile.GFile(file_path, 'rb') as f:
      data = f.read()
  except tf.errors.NotFoundError:
    raise CheckpointError(f'{file_path}: checkpoint file is missing') from None
  return _safe_loads(data, file_path, gzip)


def check_finite(arrays, what):
  """Raises NonFiniteWeightsError naming `what` (a path, 'step 12') if a float
  array of `arrays` (numpy or jax; bfloat16 as uint16 bits pass) is not finite."""
  for i, a in enumerate(arrays):
    if not jax.numpy.issubdtype(getattr(a, 'dtype', np.float32),
                                jax.numpy.inexact):
      continue
    xp = jax.numpy if isinstance(a, jax.Array) else np  # Reduce where it is.
    n_bad = int(xp.size(a) - xp.isfinite(a).sum())
    if n_bad:
      raise NonFiniteWeightsError(
          f'{what}: weight array {i} {tuple(np.shape(a))} holds {n_bad:,} NaN '
          'or infinite values (the run diverged)')


def read_arrays(path):
  """The list of numpy arrays of a trax `.npy.gz` file, read strictly.

  Unlike `tl.np_from_file`, which stops silently at the first error (so a
  truncated file loads as fewer weights), any damage is an error here.
  """
  arrays = []
  try:
    with _open_checkpoint_file(path) as f, \
        gzip.GzipFile(fileobj=f, mode='rb') as g:
      while g.peek(1):
        arrays.append(np.lib.format.read_array(g, allow_pickle=False))
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint file is missing') from None
  except hg_files.NotRegularFileError as e:
    raise CheckpointError(f'{e}; not reading it as a checkpoint') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'{path}: truncated or corrupt checkpoint array file after '
        f'{len(arrays)} arrays ({type(e).__name__}: {e})') from e
  return arrays


def check_shapes(where, model_arrays, saved_arrays, what, fix):
  """Raises CheckpointError unless `saved_arrays` fit `model_arrays` (flat, None
  not checked) one to one; the message names `where` (the file), `what`
  ('weight', 'optimizer slot') and `fix` (what the user can do)."""
  if len(model_arrays) != len(saved_arrays):
    raise CheckpointError(
        f'{where} holds {len(saved_arrays)} {what} arrays but the model has '
        f'{len(model_arrays)}; {fix}')
  for i, (m, s) in enumerate(zip(model_arrays, saved_arrays)):
    if m is not None and s is not None and tuple(m.shape) != tuple(s.shape):
      raise CheckpointError(
          f'{what.capitalize()} array {i} of {where} has shape '
          f'{tuple(s.shape)}, the model expects {tuple(m.shape)}; {fix}')


def _gzip_writer(write_fn, compresslevel):
  def write(fileobj):
    # mtime=0 so identical checkpoints are byte-identical.
    with gzip.GzipFile(fileobj=fileobj, mode='wb', compresslevel=compresslevel,
                       mtime=0) as g:
      write_fn(g)
  return write


def arrays_writer(arrays, compresslevel):
  def write(g):
    for x in arrays:
      np.save(g, np.asarray(x), allow_pickle=False)
  return _gzip_writer(write, compresslevel)


def pickle_writer(obj, compresslevel=None):
  def write(f):
    pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
  return write if compresslevel is None else _gzip_writer(write, compresslevel)


def from_bits(arrays):
  """uint16 arrays back to bfloat16, as `Loop._from_bits` (trax's convention)."""
  return [jax.lax.bitcast_convert_type(a, jax.numpy.bfloat16)
          if getattr(a, 'dtype', None) == np.uint16 else a for a in arrays]
