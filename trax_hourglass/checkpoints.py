"""Crash-safe checkpoints for trax's `training.Loop`, in trax's own file format.

trax 1.4.1 writes a checkpoint as separate files (`model.pkl.gz` with the step,
`model.weights.npy.gz`, `model.opt_slots0.npy.gz`, and `data_counters0.pkl`
written without even a temporary name). A crash between them leaves a torn set:
weights of step n with the step number, slots or data position of step n-k, or
a half-written pickle that makes the next run die on start. Here a checkpoint is
one unit:

  output_dir/
    model.pkl.gz            -> checkpoints/model/CURRENT/model.pkl.gz
    model.weights.npy.gz    -> checkpoints/model/CURRENT/model.weights.npy.gz
    model.opt_slots0.npy.gz -> checkpoints/model/CURRENT/model.opt_slots0.npy.gz
    data_counters0.pkl      -> checkpoints/model/CURRENT/data_counters0.pkl
    checkpoints/model/
      CURRENT -> step_000001000.5f3a9c1e   (the commit pointer, a symlink)
      step_000001000.5f3a9c1e/   (committed: the files above + MANIFEST.json)
      step_000000500.0b7d2e44/   (the previous one, kept)

Saving writes every file into a fresh hidden folder, fsyncs the files, writes
MANIFEST.json (size and sha256 of each file), fsyncs, renames the folder to its
final name and then commits by replacing the `CURRENT` symlink with rename(2),
which is atomic: after `kill -9` at any instant `CURRENT` names either the whole
new checkpoint or the whole previous one. The top-level names are relative
symlinks that go through `CURRENT`, so the same single rename switches all of
them at once and trax's own readers (`pickle`, `tl.np_from_file`,
`Layer.init_from_file`, an unpatched `Loop.load_checkpoint`) keep working on
`output_dir`. (Copy an output_dir with `cp -a`/`rsync -a`, which keep the
relative links; copies that follow links, `cp -rL`, or drop them, like
`gsutil cp -r`, load and keep saving too: the pointer is recovered as below.)
Older folders than the previous one are deleted after the commit, never one
of a step at or after the new one; folders left by a crash are deleted on the
next save. A failed save (a full disk) leaves no partial folder and keeps the
previous checkpoint.

When `CURRENT` is missing, dangling, or not a link, or names a folder that
fails its manifest, the newest folder whose MANIFEST.json verifies is used,
with a warning that names what was wrong and what is used; when there are
folders but none verifies, loading refuses (CheckpointError) rather than
restart from step 0 over them. A checkpoint whose weights are not finite (a
diverged run) is refused by `save_loop_checkpoint`, so it never replaces the
last finite one. `lock_output_dir` keeps a second trainer off an output dir.

Loading never executes code from a file: pickles are read by `SafeUnpickler`
(also trax's own `training.unpickle_from_file` once installed),
which admits only what trax writes (numpy arrays, dtypes and scalars, jax
arrays, which are read back as numpy arrays, `trax.shapes.ShapeDtype`,
`collections.defaultdict`/`OrderedDict`, and builtin containers and numbers);
`.npy.gz` files are read with `allow_pickle=False`, array by array, and a file
that is truncated, fails its gzip CRC, does not match its MANIFEST.json or holds
anything else raises `CheckpointError` naming the file.

Besides what trax saves, the pickle holds the Loop's random key (`'rng'`), and
the data position (trax's `inputs.data_counters`, which the streams of
`trax_hourglass.data` use to resume exactly where they stopped) is part of the
same commit. A resumed Loop continues at the saved step with the saved weights,
state, optimizer slots, history, key and data position.

Use: call `install()` once (the `trainer` script does). It patches, in this one
place, `trax.supervised.training.Loop.save_checkpoint`/`load_checkpoint`,
`trax.data.inputs.save_data_counters`/`load_data_counters`,
`trax.layers.base.Layer.init_from_file` and `training.unpickle_from_file`
(which trax's old `Trainer` loads with), so every Loop, including the one built
by `trax.supervised.trainer_lib.train`, saves and loads this way. Output dirs
that are not local paths (e.g. `gs://...`, which has no atomic rename or
symlinks) keep trax's own saving, with a warning, and are read safely.
"""

import collections
import dataclasses
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import socket
import time
import typing

from absl import logging
import numpy as np
from numpy._core import multiarray as _np_multiarray
from numpy._core import numeric as _np_numeric

from trax_hourglass import compat

compat.apply()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from trax import fastmath
from trax import layers as tl
from trax import shapes
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import history as trax_history
from trax.supervised import training
# pylint: enable=g-import-not-at-top,wrong-import-position

FORMAT = 'trax_hourglass.checkpoint/1'
CHECKPOINTS_DIR = 'checkpoints'
CURRENT = 'CURRENT'
MANIFEST = 'MANIFEST.json'
_TMP_PREFIX = '.tmp-'

# trax's originals, kept for `uninstall()` and for non-local output dirs.
TRAX_SAVE_CHECKPOINT = training.Loop.save_checkpoint
TRAX_LOAD_CHECKPOINT = training.Loop.load_checkpoint
TRAX_SAVE_DATA_COUNTERS = trax_inputs.save_data_counters
TRAX_LOAD_DATA_COUNTERS = trax_inputs.load_data_counters
TRAX_INIT_FROM_FILE = base.Layer.init_from_file
TRAX_UNPICKLE_FROM_FILE = training.unpickle_from_file


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, modified or holds forbidden data."""


class NonFiniteWeightsError(ValueError):
  """Weights hold NaN or infinity: the run diverged."""


class OutputDirInUseError(ValueError):
  """Another live process trains into the same output dir."""


# ---------------------------------------------------------------------------
# Safe reading.
# ---------------------------------------------------------------------------


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


def safe_unpickle(path, compressed=True):
  """Reads a (gzipped) pickle written by trax without executing code from it.

  Args:
    path: the file.
    compressed: whether it is gzipped (`*.pkl.gz`) or plain (`*.pkl`).

  Returns:
    The unpickled object: containers, numbers, strings, numpy arrays.

  Raises:
    CheckpointError naming `path` when it is truncated, corrupt or holds
    anything but the types trax writes.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint file is missing') from None
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
  """Raises NonFiniteWeightsError naming `what` if a float array is not finite.

  Args:
    arrays: weight arrays (numpy or jax; bfloat16 ones may be uint16 bits,
      which are integers here and pass).
    what: what they are, for the message (a path, 'step 12', ...).
  """
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


def read_arrays(path, n_arrays=None):
  """Reads the arrays of a trax `.npy.gz` file, strictly.

  Unlike `tl.np_from_file`, which stops silently at the first error (so a
  truncated file loads as fewer weights), any damage is an error here.

  Args:
    path: a file written by `tl.np_to_file` or by this module.
    n_arrays: how many arrays it must hold, or None when unknown.

  Returns:
    A list of numpy arrays.
  """
  arrays = []
  try:
    with open(path, 'rb') as f, gzip.GzipFile(fileobj=f, mode='rb') as g:
      while g.peek(1):
        arrays.append(np.lib.format.read_array(g, allow_pickle=False))
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint file is missing') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'{path}: truncated or corrupt checkpoint array file after '
        f'{len(arrays)} arrays ({type(e).__name__}: {e})') from e
  if n_arrays is not None and len(arrays) != n_arrays:
    raise CheckpointError(f'{path}: holds {len(arrays)} arrays, its manifest '
                          f'says {n_arrays}')
  return arrays


def sha256_of(path):
  """Hex sha256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


# ---------------------------------------------------------------------------
# Durable writing.
# ---------------------------------------------------------------------------


class _HashingWriter:
  """A write-only file object that hashes and counts what passes through."""

  def __init__(self, f):
    self._f = f
    self.sha256 = hashlib.sha256()
    self.n_bytes = 0

  def write(self, b):
    self.sha256.update(b)
    self.n_bytes += len(b)
    return self._f.write(b)

  def flush(self):
    self._f.flush()


def _fsync_dir(path):
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_durably(path, write_fn):
  """Writes a new file with `write_fn(fileobj)`, fsyncs it; returns its record."""
  with open(path, 'xb') as f:
    w = _HashingWriter(f)
    write_fn(w)
    f.flush()
    os.fsync(f.fileno())
  return {'bytes': w.n_bytes, 'sha256': w.sha256.hexdigest()}


def _gzip_writer(write_fn, compresslevel):
  def write(fileobj):
    # mtime=0 so identical checkpoints are byte-identical.
    with gzip.GzipFile(fileobj=fileobj, mode='wb', compresslevel=compresslevel,
                       mtime=0) as g:
      write_fn(g)
  return write


def _arrays_writer(arrays, compresslevel):
  def write(g):
    for x in arrays:
      np.save(g, np.asarray(x), allow_pickle=False)
  return _gzip_writer(write, compresslevel)


def _pickle_writer(obj, compresslevel=None):
  def write(f):
    pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
  return write if compresslevel is None else _gzip_writer(write, compresslevel)


def _replace_symlink(target, link_path):
  """Points `link_path` at `target` atomically (symlink to a temp, rename)."""
  tmp = f'{link_path}.{_TMP_PREFIX}{secrets.token_hex(4)}'
  os.symlink(target, tmp)
  os.replace(tmp, link_path)


def _write_file_atomically(path, write_fn):
  tmp = f'{path}.{_TMP_PREFIX}{secrets.token_hex(4)}'
  _write_durably(tmp, write_fn)
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path) or '.')


# ---------------------------------------------------------------------------
# The checkpoint unit.
# ---------------------------------------------------------------------------


def is_local(path):
  """Whether `path` is on the local filesystem (has no `scheme://`)."""
  return '://' not in str(path)


def _checkpoint_root(directory, basename):
  return os.path.join(directory, CHECKPOINTS_DIR, basename)


def _data_counters_name(host_id=None):
  host_id = jax.process_index() if host_id is None else host_id
  return f'data_counters{host_id}.pkl'


def commit(directory, basename, files, step, keep=2):
  """Writes `files` as one checkpoint unit and commits it atomically.

  Args:
    directory: the output dir.
    basename: checkpoint name, e.g. 'model'; files are named `basename.*`.
    files: dict from file name (no directory) to a function writing it to a
      file object. Top-level names in `directory` are linked to each.
    step: the training step, for the folder name and manifest.
    keep: how many committed checkpoints of this basename to keep (>= 2 keeps
      the previous one besides the new one).

  Returns:
    The committed folder's path.

  Raises:
    CheckpointError saying what failed when the filesystem refuses a write
    (a full disk, no permission); the previous checkpoint stays committed and
    no partial folder is left.
  """
  root = _checkpoint_root(directory, basename)
  try:
    return _commit(directory, basename, root, files, step, keep)
  except OSError as e:
    raise CheckpointError(
        f'{root}: could not save the checkpoint of step {int(step)} '
        f'({e.strerror or e}); the previous checkpoint is kept. Free disk '
        'space (or fix the permissions) and rerun to resume from it.') from e


def _commit(directory, basename, root, files, step, keep):
  """`commit` (see there), raising the filesystem's own errors."""
  if not os.path.isdir(root):
    os.makedirs(root)
    _fsync_dir(os.path.dirname(root))
    _fsync_dir(os.path.dirname(os.path.dirname(root)))
  _remove_leftovers(root)
  name = f'step_{int(step):09d}.{secrets.token_hex(4)}'
  tmp = os.path.join(root, _TMP_PREFIX + name)
  os.mkdir(tmp)
  try:
    records = {}
    for file_name, write_fn in files.items():
      records[file_name] = _write_durably(os.path.join(tmp, file_name),
                                          write_fn)
    manifest = {'format': FORMAT, 'basename': basename, 'step': int(step),
                'time': time.time(), 'files': records}
    _write_durably(os.path.join(tmp, MANIFEST),
                   lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    _fsync_dir(tmp)
    folder = os.path.join(root, name)
    os.rename(tmp, folder)
  except BaseException:
    # A full disk must not leave a partial folder behind (nor wait for the
    # next save to remove it: there may be none).
    try:
      shutil.rmtree(tmp, ignore_errors=True)
    except Exception:  # pylint: disable=broad-except
      pass
    raise
  _fsync_dir(root)
  # The commit: one atomic rename switches every file at once.
  pointer = os.path.join(root, CURRENT)
  previous = os.readlink(pointer) if os.path.islink(pointer) else None
  if os.path.lexists(pointer) and previous is None:
    _set_aside(root, pointer)  # A copy made with links followed (cp -rL).
  if previous is not None and not os.path.isdir(os.path.join(root, previous)):
    previous = None  # Dangling: it must not take the place of a kept one.
  _replace_symlink(name, pointer)
  _fsync_dir(root)
  _link_top_level(directory, basename, list(files))
  _remove_old(root, keep_names={name, previous}, keep=keep, step=int(step))
  return folder


def _set_aside(root, pointer):
  """Moves a `CURRENT` that is not a link out of the way, losing nothing.

  A whole folder (a copy that followed the link) becomes a checkpoint folder
  of its step, pruned like the others; anything else is kept as
  `CURRENT.damaged-*`.
  """
  target = None
  if os.path.isdir(pointer) and not os.path.islink(pointer):
    try:
      step = int(_verify_manifest(pointer)['step'])
      target = f'step_{step:09d}.{secrets.token_hex(4)}'
    except (CheckpointError, KeyError, TypeError, ValueError):
      pass
  if target is None:
    target = f'{CURRENT}.damaged-{secrets.token_hex(4)}'
  os.rename(pointer, os.path.join(root, target))
  _fsync_dir(root)


def _link_top_level(directory, basename, file_names):
  """Makes `directory/<file>` a relative symlink through CURRENT, if not yet."""
  changed = False
  for entry in os.listdir(directory):  # Temp links a crash left behind.
    if _TMP_PREFIX in entry and os.path.islink(os.path.join(directory, entry)):
      os.unlink(os.path.join(directory, entry))
  for file_name in file_names:
    target = os.path.join(CHECKPOINTS_DIR, basename, CURRENT, file_name)
    link = os.path.join(directory, file_name)
    if os.path.islink(link) and os.readlink(link) == target:
      continue
    _replace_symlink(target, link)  # Replaces an old plain trax file too.
    changed = True
  if changed:
    _fsync_dir(directory)


def _remove_leftovers(root):
  """Deletes what a crashed save left: temp folders and temp symlinks."""
  for entry in os.listdir(root):
    if entry.startswith(_TMP_PREFIX) or _TMP_PREFIX in entry:
      path = os.path.join(root, entry)
      if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
      else:
        shutil.rmtree(path, ignore_errors=True)


def _step_of(name):
  """The step of a folder name `step_000000012.<hex>`, or None."""
  head = name.split('.')[0]
  if not head.startswith('step_') or not head[5:].isdigit():
    return None
  return int(head[5:])


def _remove_old(root, keep_names, keep, step):
  folders = sorted(e for e in os.listdir(root) if _step_of(e) is not None)
  keep_names = {n for n in keep_names if n}
  # Newest first by step, then keep `keep` of them (always the ones named).
  by_step = sorted(folders, key=lambda e: e.split('.')[0], reverse=True)
  kept = set(keep_names)
  for e in by_step:
    if len(kept) >= keep:
      break
    kept.add(e)
  for e in folders:
    # Only what the new commit supersedes: never a folder of a later step
    # (one this run could not read is still someone's work).
    if e not in kept and _step_of(e) < step:
      shutil.rmtree(os.path.join(root, e), ignore_errors=True)


@dataclasses.dataclass
class Checkpoint:
  """What one checkpoint holds, read safely.

  Attributes:
    step: the training step it was saved at.
    data: the pickled dict (trax's keys: flat_state, flat_eval_state, history,
      input_signature, ...; plus 'rng' when written here).
    flat_weights: list of numpy arrays (bfloat16 ones as uint16 bits).
    slots_per_task: list (per training task) of lists of numpy arrays.
    data_counters: dict of data positions, or None.
    path: the committed folder, or the directory of a plain trax checkpoint.
    manifest: the MANIFEST.json dict, or None for a plain trax checkpoint.
  """
  step: int
  data: dict
  flat_weights: list
  slots_per_task: list
  data_counters: typing.Optional[dict]
  path: str
  manifest: typing.Optional[dict]


def committed_folder(directory, basename='model'):
  """The committed folder of `basename` in `directory`, or None if none.

  When the `CURRENT` pointer is missing or damaged, the newest folder whose
  manifest verifies, with a warning (see the module docstring).
  """
  return _locate(directory, basename, verify=False)[0]


_WARNED = set()


def _warn_once(message):
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning('%s', message)


def _manifest_time(folder):
  try:
    with open(os.path.join(folder, MANIFEST), 'rb') as f:
      return float(json.loads(f.read().decode()).get('time', 0))
  except Exception:  # pylint: disable=broad-except
    return 0.0  # Damaged: verified (and refused) later.


def _locate(directory, basename, verify):
  """(committed folder or None, its verified manifest or None).

  Follows `CURRENT`; when it is missing, dangling, not a link, or (with
  `verify`) names a folder that fails its manifest, falls back to the newest
  folder that verifies, and warns naming both. Refuses (CheckpointError) when
  there are folders but none verifies.
  """
  root = _checkpoint_root(directory, basename)
  if not os.path.isdir(root):
    return None, None
  pointer = os.path.join(root, CURRENT)
  damaged = None
  if os.path.islink(pointer):
    folder = os.path.join(root, os.readlink(pointer))
    if os.path.isdir(folder):
      if not verify:
        return folder, None
      try:
        return folder, _verify_manifest(folder)
      except CheckpointError as e:
        damaged = folder
        problem = f'the newest checkpoint {folder} is damaged: {e}'
    else:
      problem = f'{pointer} points to {folder}, which is missing'
  elif os.path.isdir(pointer):
    problem = (f'{pointer} is a folder, not a link to one (copied with links '
               'followed, e.g. cp -rL)')
  elif os.path.lexists(pointer):
    problem = f'{pointer} is a plain file, not a link to a checkpoint folder'
  else:
    problem = f'{pointer} is missing'
  names = [e for e in os.listdir(root) if _step_of(e) is not None and
           os.path.isdir(os.path.join(root, e))]
  candidates = sorted(
      (os.path.join(root, e) for e in names),
      key=lambda f: (_step_of(os.path.basename(f)), _manifest_time(f)),
      reverse=True)
  if os.path.isdir(pointer) and not os.path.islink(pointer):
    candidates.append(pointer)  # The copy itself, if nothing else is left.
  candidates = [f for f in candidates if f != damaged]
  if not candidates and damaged is None and not os.path.lexists(pointer):
    return None, None  # Nothing was ever committed here.
  first_error = None
  for folder in candidates:
    try:
      manifest = _verify_manifest(folder)
    except CheckpointError as e:
      first_error = first_error or e
      continue
    _warn_once(f'{problem}; using the newest intact checkpoint, {folder} '
               f'(step {manifest.get("step")}). The next save repairs the '
               'pointer.')
    return folder, manifest
  raise CheckpointError(
      f'{problem}, and none of the {len(candidates)} other checkpoint folders '
      f'in {root} is intact' + (f' (newest: {first_error})' if first_error
                                else '') +
      '. Not training from step 0 over them: restore the directory from a '
      f'copy, or move {root} away to start afresh.')


def _top_level_is_ours(directory, basename, manifest):
  """Whether `directory/basename.pkl.gz` is the committed checkpoint's.

  A link through CURRENT, nothing, or a plain copy of the committed file
  (a copy that followed links) are; a file trax wrote itself is not.
  """
  link = os.path.join(directory, basename + '.pkl.gz')
  if not os.path.lexists(link):
    return True
  if os.path.islink(link):
    return os.readlink(link).startswith(
        os.path.join(CHECKPOINTS_DIR, basename, CURRENT))
  record = (manifest or {}).get('files', {}).get(basename + '.pkl.gz')
  return (record is not None and os.path.isfile(link) and
          os.path.getsize(link) == record['bytes'] and
          sha256_of(link) == record['sha256'])


def _verify_manifest(folder):
  path = os.path.join(folder, MANIFEST)
  try:
    with open(path, 'rb') as f:
      manifest = json.loads(f.read().decode())
    files = manifest['files']
    if manifest.get('format') != FORMAT:
      raise ValueError(f'unknown format {manifest.get("format")!r}')
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint manifest is missing') from None
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: corrupt checkpoint manifest ({e})') from e
  for file_name, record in files.items():
    file_path = os.path.join(folder, os.path.basename(file_name))
    if not os.path.exists(file_path):
      raise CheckpointError(f'{file_path}: checkpoint file is missing')
    size = os.path.getsize(file_path)
    if size != record['bytes']:
      raise CheckpointError(
          f'{file_path}: has {size} bytes, its manifest says '
          f'{record["bytes"]} (truncated or modified)')
    if sha256_of(file_path) != record['sha256']:
      raise CheckpointError(
          f'{file_path}: sha256 differs from its manifest (modified or '
          'corrupt)')
  return manifest


def read_checkpoint(directory, basename='model', n_tasks=None):
  """Reads a checkpoint safely; None when there is none.

  Reads the committed folder when `directory` has one (verifying its
  manifest), else plain trax files `directory/basename.*`.

  Args:
    directory: an output dir.
    basename: the checkpoint's name ('model', 'model_1000', ...).
    n_tasks: how many optimizer slot files to read; None reads all there are.

  Returns:
    A `Checkpoint` or None.
  """
  if basename.endswith('.pkl.gz'):
    basename = basename[:-len('.pkl.gz')]
  folder, manifest = _locate(directory, basename, verify=True)
  if folder is not None and _top_level_is_ours(directory, basename, manifest):
    path = folder
  else:
    manifest = None
    if folder is not None:
      logging.warning('%s: plain trax files (written by trax after this '
                      'checkpoint) are used instead of %s.',
                      os.path.join(directory, basename + '.pkl.gz'), folder)
    path = directory
    if not os.path.exists(os.path.join(path, basename + '.pkl.gz')):
      return None
  prefix = os.path.join(path, basename)
  data = safe_unpickle(prefix + '.pkl.gz')
  if not isinstance(data, dict) or 'step' not in data:
    raise CheckpointError(f'{prefix}.pkl.gz: not a trax checkpoint (no step)')
  if isinstance(data.get('flat_weights'), int):
    flat_weights = read_arrays(prefix + '.weights.npy.gz')
  else:  # trax's older format: weights inside the pickle.
    flat_weights = list(data['flat_weights'])
  if 'slots' in data:  # trax's oldest format: one task's slots in the pickle.
    slots_per_task = [data['slots']]
  elif isinstance(data.get('slots_per_task'), int):
    slots_per_task = []
    i = 0
    while (n_tasks is None and os.path.exists(f'{prefix}.opt_slots{i}.npy.gz')
           or n_tasks is not None and i < n_tasks):
      slots_per_task.append(read_arrays(f'{prefix}.opt_slots{i}.npy.gz'))
      i += 1
  else:
    slots_per_task = list(data.get('slots_per_task') or [])
  # Every process resumes at process 0's data position: this project's
  # streams count global batches, the same on every process (only process 0
  # commits checkpoints).
  counters_path = os.path.join(path, _data_counters_name(0))
  data_counters = None
  if manifest is not None and os.path.exists(counters_path):
    data_counters = safe_unpickle(counters_path, compressed=False)
  return Checkpoint(step=int(data['step']), data=data,
                    flat_weights=flat_weights, slots_per_task=slots_per_task,
                    data_counters=data_counters, path=path, manifest=manifest)


# ---------------------------------------------------------------------------
# Loop save/load.
# ---------------------------------------------------------------------------


def _to_numpy_tree(x):
  """jax arrays -> numpy arrays inside containers, keeping container types."""
  if isinstance(x, jax.Array):
    return np.asarray(x)
  if isinstance(x, collections.defaultdict):
    return collections.defaultdict(
        x.default_factory, {k: _to_numpy_tree(v) for k, v in x.items()})
  if isinstance(x, dict):
    return type(x)((k, _to_numpy_tree(v)) for k, v in x.items())
  if isinstance(x, (list, tuple)) and not hasattr(x, '_fields'):
    return type(x)(_to_numpy_tree(v) for v in x)
  return x


def _rng_to_numpy(rng):
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng)


def save_loop_checkpoint(loop, basename, keep=2):
  """`Loop.save_checkpoint`, crash-safe (see the module docstring).

  Args:
    loop: a `trax.supervised.training.Loop`.
    basename: checkpoint name, e.g. 'model' (resumed from) or 'model_1000'.
    keep: committed checkpoints of this name to keep, at least 2.
  """
  # pylint: disable=protected-access
  output_dir = loop._output_dir
  if output_dir is None:
    training._log('Did not save checkpoint as output_dir is None')
    return
  if not is_local(output_dir):
    logging.warning('%s is not a local path: saving with trax\'s own, not '
                    'crash-safe, checkpoints.', output_dir)
    return TRAX_SAVE_CHECKPOINT(loop, basename)
  counters = dict(trax_inputs.data_counters)
  if not loop.is_chief:  # Process 0's checkpoint holds the data position.
    training._log('Did not save checkpoint as we are not chief.', stdout=False)
    return
  pkl_name = basename + '.pkl.gz'
  training._log('Saving checkpoint to %s' % os.path.join(output_dir, pkl_name),
                stdout=False)
  weights = loop._model.weights
  if base.N_WEIGHTS_SHARDS > 1:
    weights = loop._trainer_per_task[0].accelerated_model_with_loss.weights
    weights = tl.unshard(weights)
  state = loop._model.state
  compresslevel = 0 if loop._use_memory_efficient_trainer else 2
  files = {}
  for i, trainer in enumerate(loop._trainer_per_task):
    flat_slots = loop._to_bits(training._flatten_and_remove_empty(trainer.slots))
    files[f'{basename}.opt_slots{i}.npy.gz'] = _arrays_writer(flat_slots,
                                                             compresslevel)
  input_signature = loop._batch_signature[:loop._model.n_in]
  flat_weights, flat_state = tl.flatten_weights_and_state(weights, state)
  _refuse_non_finite(output_dir, basename, loop.step, flat_weights)
  _, flat_eval_state = tl.flatten_weights_and_state(weights,
                                                    loop._eval_model.state)
  files[f'{basename}.weights.npy.gz'] = _arrays_writer(
      loop._to_bits(flat_weights), compresslevel)
  d = {
      'step': loop.step,
      'flat_weights': compresslevel,  # trax: weights are in .weights.npy.gz
      'flat_state': _to_numpy_tree(loop._to_bits(flat_state)),
      'flat_eval_state': _to_numpy_tree(loop._to_bits(flat_eval_state)),
      'history': _to_numpy_tree(loop._history.to_dict()),
      'slots_per_task': compresslevel,  # trax: slots are in .opt_slotsN.npy.gz
      'input_signature': input_signature,
      'version_timestamp': 'Mar-10-2021',  # trax's format version.
      'rng': _rng_to_numpy(loop._rng),  # Extra: trax's loader ignores it.
  }
  files[pkl_name] = _pickle_writer(d, compresslevel=9)
  files[_data_counters_name()] = _pickle_writer(counters)
  if basename != 'model':
    # Only the checkpoint a run resumes from owns the top-level data counters.
    files = {k: v for k, v in files.items()
             if not k.startswith('data_counters')}
  commit(output_dir, basename, files, loop.step, keep=keep)
  training._log('Checkpoint saved in %s' % os.path.join(output_dir, pkl_name),
                stdout=False)
  # pylint: enable=protected-access


def _refuse_non_finite(output_dir, basename, step, flat_weights):
  """A diverged run stops here, before its weights replace finite ones."""
  try:
    check_finite(flat_weights, f'step {step}')
  except NonFiniteWeightsError as e:
    try:
      last = committed_folder(output_dir, basename)
    except CheckpointError:
      last = None
    kept = (f'the checkpoint of step {_step_of(os.path.basename(last))} in '
            f'{output_dir} is kept' if last else 'nothing is saved')
    raise NonFiniteWeightsError(
        f'training diverged: {e}; not saving them ({kept}). Lower the '
        'learning rate (or check the data) and rerun to resume from the last '
        'checkpoint.') from None


def _strict_match(name, model_arrays, saved_arrays, what):
  """Checks saved arrays fit the model's one to one; returns the saved ones."""
  if len(model_arrays) != len(saved_arrays):
    raise CheckpointError(
        f'{name}: holds {len(saved_arrays)} {what} arrays but the model has '
        f'{len(model_arrays)}; this checkpoint is from a different model or '
        'optimizer config (use another output_dir, or the same config).')
  for i, (m, s) in enumerate(zip(model_arrays, saved_arrays)):
    if m is not None and s is not None and tuple(m.shape) != tuple(s.shape):
      raise CheckpointError(
          f'{name}: {what} array {i} has shape {tuple(s.shape)}, the model '
          f'expects {tuple(m.shape)}; this checkpoint is from a different '
          'model config.')
  return list(saved_arrays)


def load_loop_checkpoint(loop, directory=None, filename=None):
  """`Loop.load_checkpoint`, reading safely and strictly (module docstring).

  Args:
    loop: a `trax.supervised.training.Loop`.
    directory: directory with the checkpoint (the Loop's output_dir default).
    filename: checkpoint name ('model' by default; '.pkl.gz' may be appended).
  """
  # pylint: disable=protected-access
  directory = directory or loop._output_dir
  if directory is None:
    training._log('Not loading as both directory and output_dir are None.',
                  stdout=False)
    return
  if not is_local(directory):
    return TRAX_LOAD_CHECKPOINT(loop, directory, filename)
  basename = filename or 'model'
  if basename.endswith('.pkl.gz'):
    basename = basename[:-len('.pkl.gz')]
  ckpt = read_checkpoint(directory, basename,
                         n_tasks=len(loop._trainer_per_task))
  if ckpt is None:
    training._log(f'Not loading as there is no checkpoint {basename} in '
                  f'{directory}', stdout=False)
    return
  pkl_path = os.path.join(ckpt.path, basename + '.pkl.gz')
  training._log('Loading checkpoint from %s' % pkl_path, stdout=False)
  if len(ckpt.slots_per_task) != len(loop._trainer_per_task):
    raise CheckpointError(
        f'{pkl_path}: has optimizer slots for {len(ckpt.slots_per_task)} '
        f'tasks, this Loop trains {len(loop._trainer_per_task)}')
  for i, (trainer, slots) in enumerate(zip(loop._trainer_per_task,
                                           ckpt.slots_per_task)):
    model_slots = loop._to_bits(training._flatten_and_remove_empty(
        trainer.slots))
    matched = _strict_match(
        os.path.join(ckpt.path, f'{basename}.opt_slots{i}.npy.gz'),
        model_slots, training._flatten_and_remove_empty(slots),
        'optimizer slot')
    trainer.slots, _ = fastmath.tree_unflatten(
        loop._from_bits(matched), trainer.slots, copy_from_tree=[None, ()])
  d = ckpt.data
  input_signature = d['input_signature']
  sig = loop._model.weights_and_state_signature(input_signature)
  flat_init_weights, flat_init_state = tl.flatten_weights_and_state(
      loop._model.weights, loop._model.state)
  matched_weights = loop._from_bits(_strict_match(
      os.path.join(ckpt.path, f'{basename}.weights.npy.gz'),
      loop._to_bits(flat_init_weights), ckpt.flat_weights, 'weight'))
  try:
    restored_state = True
    matched_state = loop._from_bits(training._match_by_shape(
        loop._to_bits(flat_init_state), d['flat_state']))
    weights, state = tl.unflatten_weights_and_state(matched_weights,
                                                    matched_state, sig)
    loop._model.state = state
  except IndexError:  # As trax: a changed state layout keeps the fresh state.
    training._log('Failed loading model state from checkpoint, loading '
                  'weights only.')
    restored_state = False
    weights, _ = tl.unflatten_weights_and_state(matched_weights, (), sig,
                                                weights_only=True)
  loop._model.weights = weights
  loop._eval_model.weights = loop._model.weights
  if restored_state:
    flat_eval_state = d.get('flat_eval_state', d['flat_state'])
    _, eval_state = tl.unflatten_weights_and_state(
        matched_weights, loop._from_bits(list(flat_eval_state)), sig)
    loop._eval_model.state = eval_state
  loop._step = int(d['step'])
  loop._history = trax_history.History.from_dict(d['history'])
  if 'rng' in d and loop._n_hosts == 1:
    rng = jax.numpy.asarray(d['rng'], dtype=jax.numpy.uint32)
    loop._rng = tl.on_cpu(rng) if loop._use_memory_efficient_trainer else rng
  if (ckpt.data_counters is not None and loop._output_dir is not None and
      os.path.realpath(directory) == os.path.realpath(loop._output_dir)):
    trax_inputs.data_counters = dict(ckpt.data_counters)
  # Send the restored weights and state to the accelerated (replicated) copies
  # the trainers made before loading.
  if all(hasattr(t, 'accelerated_model_with_loss')
         for t in loop._trainer_per_task):
    loop.update_weights_and_state(loop._model.weights,
                                  loop._model.state if restored_state else None)
  training._log('Checkpoint loaded from %s' % pkl_path, stdout=False)
  # pylint: enable=protected-access


def save_data_counters(output_dir, host_id=None):
  """`inputs.save_data_counters`, written atomically (temp file, rename)."""
  if not is_local(output_dir):
    return TRAX_SAVE_DATA_COUNTERS(output_dir, host_id)
  path = os.path.join(output_dir, _data_counters_name(host_id))
  if os.path.islink(path):
    os.unlink(path)  # It pointed into a checkpoint: never write through it.
  _write_file_atomically(path, _pickle_writer(dict(trax_inputs.data_counters)))


def load_data_counters(output_dir, host_id=None):
  """`inputs.load_data_counters`, reading the committed data position safely."""
  path = os.path.join(output_dir, _data_counters_name(host_id))
  if not is_local(output_dir):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(path):
      return
    counters = unpickle_from_file(path, gzip=False)
  elif not os.path.exists(path):
    logging.info('Did not load data counters as %s does not exist.', path)
    return
  elif os.path.islink(path):
    # Through CURRENT: the Loop's load_checkpoint restores them from the
    # folder it verified (not a damaged newest one it fell back from).
    return
  else:
    counters = safe_unpickle(path, compressed=False)
  if not isinstance(counters, dict):
    raise CheckpointError(f'{path}: data counters must be a dict, found '
                          f'{type(counters).__name__}')
  trax_inputs.data_counters = counters


def init_from_file(layer, file_name, weights_only=False, input_signature=None):
  """`Layer.init_from_file` (trax's model loader), reading safely.

  Args:
    layer: the trax layer (model) to initialize.
    file_name: a `*.pkl.gz` checkpoint (top-level or inside a committed
      folder), or an output dir, which means its committed `model` checkpoint.
    weights_only: restore only weights, not state.
    input_signature: used instead of the one saved.

  Returns:
    A `(weights, state)` tuple, as trax's.
  """
  if os.path.isdir(file_name):
    directory, basename = file_name, 'model'
  else:
    directory, basename = os.path.split(file_name)
  ckpt = read_checkpoint(directory, basename, n_tasks=0)
  if ckpt is None:
    raise CheckpointError(f'{file_name}: no checkpoint there')
  d = ckpt.data
  if input_signature is None:
    input_signature = d['input_signature']
  if weights_only and input_signature is not None:
    layer.init(input_signature)
  sig = layer.weights_and_state_signature(input_signature)
  weights, state = tl.unflatten_weights_and_state(
      from_bits(ckpt.flat_weights), from_bits(d.get('flat_state', ())), sig,
      weights_only=weights_only)
  if not weights_only:
    layer.state = state
  layer.weights = weights
  return (layer.weights, layer.state)


def from_bits(arrays):
  """uint16 arrays back to bfloat16, as `Loop._from_bits` (trax's convention)."""
  return [jax.lax.bitcast_convert_type(a, jax.numpy.bfloat16)
          if getattr(a, 'dtype', None) == np.uint16 else a for a in arrays]


# ---------------------------------------------------------------------------
# One trainer per output dir.
# ---------------------------------------------------------------------------

LOCK = 'LOCK'
_LOCKS = {}  # realpath of an output dir -> fd of this process's flock on it


def lock_output_dir(directory):
  """Makes this process the only trainer of `directory` until it exits.

  An exclusive `flock` on `directory/checkpoints/LOCK`, which the OS drops
  when the process dies (even by `kill -9`), so a stale lock never blocks a
  restart; the file names the holder for the message. Taking it again in the
  same process is a no-op. Creates `directory` if needed.

  Raises:
    OutputDirInUseError naming the holder's pid and host; ValueError when
    `directory` is a file.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f'output dir {directory} is a file, not a directory; '
                     'pass a directory (it is created if missing).')
  lock_dir = os.path.join(directory, CHECKPOINTS_DIR)
  os.makedirs(lock_dir, exist_ok=True)
  key = os.path.realpath(directory)
  if key in _LOCKS:
    return
  fd = os.open(os.path.join(lock_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 512, 0).decode(errors='replace').strip()
    os.close(fd)
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise
    raise OutputDirInUseError(
        f'output dir {directory} is in use by another trainer '
        f'({holder or "a process that has not said which"}); wait for it to '
        'finish or stop it, or pass another --output_dir.') from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, (f'pid {os.getpid()} on host {socket.gethostname()}, since '
                 f'{time.strftime("%Y-%m-%d %H:%M:%S")}').encode(), 0)
  _LOCKS[key] = fd


# ---------------------------------------------------------------------------
# Installing into trax.
# ---------------------------------------------------------------------------

_INSTALLED = False


def install():
  """Makes every trax Loop save and load crash-safely (idempotent).

  Patches `training.Loop.save_checkpoint` and `load_checkpoint`,
  `trax.data.inputs.save_data_counters`/`load_data_counters` (which the Loop
  calls by module attribute), `Layer.init_from_file` and
  `training.unpickle_from_file` (trax's old Trainer reads with it).
  """
  global _INSTALLED
  if _INSTALLED:
    return
  training.Loop.save_checkpoint = save_loop_checkpoint
  training.Loop.load_checkpoint = load_loop_checkpoint
  trax_inputs.save_data_counters = save_data_counters
  trax_inputs.load_data_counters = load_data_counters
  base.Layer.init_from_file = init_from_file
  training.unpickle_from_file = unpickle_from_file
  _INSTALLED = True


def uninstall():
  """Restores trax's own checkpointing (for tests comparing with it)."""
  global _INSTALLED
  training.Loop.save_checkpoint = TRAX_SAVE_CHECKPOINT
  training.Loop.load_checkpoint = TRAX_LOAD_CHECKPOINT
  trax_inputs.save_data_counters = TRAX_SAVE_DATA_COUNTERS
  trax_inputs.load_data_counters = TRAX_LOAD_DATA_COUNTERS
  base.Layer.init_from_file = TRAX_INIT_FROM_FILE
  training.unpickle_from_file = TRAX_UNPICKLE_FROM_FILE
  _INSTALLED = False
