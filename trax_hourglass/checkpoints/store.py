"""A checkpoint as one unit: written durably, committed atomically, found again.

trax 1.4.1 writes a checkpoint's files one by one (`data_counters0.pkl` not even
under a temporary name): a crash between them leaves weights, slots and data
position of different steps, or a half-written pickle. Here:

  output_dir/
    model.pkl.gz, model.weights.npy.gz, ... -> checkpoints/model/CURRENT/<same>
    checkpoints/model/
      CURRENT -> step_000001000.5f3a9c1e   (the commit pointer, a symlink)
      step_000001000.5f3a9c1e/   (committed: the files + MANIFEST.json)
      step_000000500.0b7d2e44/   (the previous one, kept)

A save writes and fsyncs every file and MANIFEST.json (size and sha256 of each)
in a hidden folder, renames it, then commits by renaming a new `CURRENT` link
over the old one: after `kill -9` at any instant `CURRENT` names a whole
checkpoint, and the relative top-level links (which trax's own readers use)
switch with it. A failed save (a full disk) leaves no partial folder. Older
folders are pruned after a commit, never one of a later step.

When `CURRENT` is missing, dangling, not a link (a copy made with `cp -rL` or
`gsutil cp -r`) or names a folder that fails its manifest, the newest folder
that verifies is used, with a warning; when none verifies, loading refuses
rather than restart from step 0 over them. `lock_output_dir` keeps a second
trainer off an output dir.
"""

import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import os
import secrets
import shutil
import socket
import stat
import time
import typing

from absl import logging
import jax

from trax_hourglass import files as hg_files
from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import read_arrays
from trax_hourglass.checkpoints.format import safe_unpickle

FORMAT = 'trax_hourglass.checkpoint/1'
CHECKPOINTS_DIR = 'checkpoints'
CURRENT = 'CURRENT'
MANIFEST = 'MANIFEST.json'
_TMP_PREFIX = hg_files.TMP_MARK
# A manifest is a few hundred bytes; anything near this is not one.
_MAX_MANIFEST_BYTES = 1 << 20


class OutputDirInUseError(ValueError):
  """Another live process trains into the same output dir."""


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


_fsync_dir = hg_files.fsync_dir


def _write_durably(path, write_fn):
  """Writes a new file with `write_fn(fileobj)`, fsyncs it; returns its record."""
  with hg_files.create_new(path) as f:
    w = _HashingWriter(f)
    write_fn(w)
    f.flush()
    os.fsync(f.fileno())
  return {'bytes': w.n_bytes, 'sha256': w.sha256.hexdigest()}


def _replace_symlink(target, link_path):
  """Points `link_path` at `target` atomically (symlink to a temp, rename)."""
  tmp = f'{link_path}.{_TMP_PREFIX}{secrets.token_hex(4)}'
  os.symlink(target, tmp)
  os.replace(tmp, link_path)


write_file_atomically = hg_files.write_atomically


def is_local(path):
  """Whether `path` is on the local filesystem (has no `scheme://`)."""
  return '://' not in str(path)


def _checkpoint_root(directory, basename):
  return os.path.join(directory, CHECKPOINTS_DIR, basename)


def data_counters_name(host_id=None):
  host_id = jax.process_index() if host_id is None else host_id
  return f'data_counters{host_id}.pkl'


def commit(directory, basename, files, step, keep=2):
  """Writes `files` as one checkpoint of `step` and commits it; its folder.

  `files` maps file names (`basename.*`, linked from the top of `directory`)
  to functions writing them to a file object; `keep` committed checkpoints of
  `basename` are kept (2: the previous one too). A write the filesystem
  refuses (a full disk) raises CheckpointError saying so; the previous
  checkpoint stays committed and no partial folder is left.
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
    if _TMP_PREFIX in entry:
      path = os.path.join(root, entry)
      if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
      else:
        shutil.rmtree(path, ignore_errors=True)


def step_of(name):
  """The step of a folder name `step_000000012.<hex>`, or None."""
  head = name.split('.')[0]
  if not head.startswith('step_') or not head[5:].isdigit():
    return None
  return int(head[5:])


def _remove_old(root, keep_names, keep, step):
  folders = sorted(sorted(e for e in os.listdir(root) if step_of(e)
                          is not None), key=step_of, reverse=True)
  kept = {n for n in keep_names if n}  # The named ones, then the newest.
  for e in folders:
    if len(kept) >= keep:
      break
    kept.add(e)
  for e in folders:
    # Only what the new commit supersedes: never a folder of a later step
    # (one this run could not read is still someone's work).
    if e not in kept and step_of(e) < step:
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
  """The committed folder of `basename` in `directory` (`_locate`), or None."""
  return _locate(directory, basename, verify=False)[0]


_WARNED = set()


def _warn_once(message):
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning('%s', message)


def _manifest_time(folder):
  try:
    return float(_read_manifest(os.path.join(folder, MANIFEST)).get('time', 0))
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
  target = os.readlink(pointer) if os.path.islink(pointer) else None
  if target is not None and (step_of(target) is None or os.sep in target):
    problem = (f'{pointer} points to {target!r}, not to a checkpoint folder '
               'beside it')
  elif target is not None:
    folder = os.path.join(root, target)
    if os.path.isdir(folder) and not os.path.islink(folder):
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
  names = [e for e in os.listdir(root) if step_of(e) is not None and
           os.path.isdir(os.path.join(root, e)) and
           not os.path.islink(os.path.join(root, e))]
  candidates = sorted(
      (os.path.join(root, e) for e in names),
      key=lambda f: (step_of(os.path.basename(f)), _manifest_time(f)),
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
  if record is None:
    return False
  try:
    _check_file(link, record)
  except CheckpointError:
    return False
  return True


def _read_manifest(path):
  """The JSON of manifest `path`, read bounded from a regular file (no link)."""
  data = hg_files.read_bounded(path, _MAX_MANIFEST_BYTES, follow_links=False)
  if len(data) > _MAX_MANIFEST_BYTES:
    raise ValueError(f'over {_MAX_MANIFEST_BYTES:,} bytes')
  return json.loads(data.decode())


def _is_count(x):
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_manifest_schema(manifest):
  """Raises ValueError saying what is wrong unless `manifest` has the shape
  `commit` writes: {'format': FORMAT, 'step': n, 'files': {name: {'bytes': n,
  'sha256': 64 hex digits}}, ...}; `files` names plain files of the folder."""
  if not isinstance(manifest, dict):
    raise ValueError(f'a {type(manifest).__name__}, not an object')
  if manifest.get('format') != FORMAT:
    raise ValueError(f'unknown format {manifest.get("format")!r}')
  if not _is_count(manifest.get('step')):
    raise ValueError(f'step {manifest.get("step")!r} is not a count')
  if not isinstance(manifest.get('time', 0), (int, float)):
    raise ValueError(f'time {manifest.get("time")!r} is not a number')
  files = manifest.get('files')
  if not isinstance(files, dict):
    raise ValueError(f'files is {type(files).__name__}, not an object')
  for name, record in files.items():
    if (not name or name in ('.', '..', MANIFEST) or os.sep in name or
        (os.altsep and os.altsep in name)):
      raise ValueError(f'{name!r} is not the name of a checkpoint file')
    if not isinstance(record, dict):
      raise ValueError(f'the record of {name} is {type(record).__name__}, '
                       'not an object')
    if not _is_count(record.get('bytes')):
      raise ValueError(f'the record of {name} has bytes '
                       f'{record.get("bytes")!r}, not a count')
    digest = record.get('sha256')
    if not (isinstance(digest, str) and len(digest) == 64 and
            all(c in '0123456789abcdef' for c in digest)):
      raise ValueError(f'the record of {name} has sha256 {digest!r}, not 64 '
                       'hex digits')


def _check_file(file_path, record):
  """Raises CheckpointError unless `file_path` is a regular file (no link)
  of the record's size and sha256; reads at most that size + 1 bytes."""
  try:
    fd = hg_files.open_regular(file_path, follow_links=False)
  except FileNotFoundError:
    raise CheckpointError(f'{file_path}: checkpoint file is missing') from None
  except (hg_files.NotRegularFileError, OSError) as e:
    raise CheckpointError(f'{file_path}: not readable as a checkpoint file '
                          f'({e})') from None
  expected = record['bytes']
  with os.fdopen(fd, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    if size != expected:
      raise CheckpointError(
          f'{file_path}: has {size} bytes, its manifest says {expected} '
          '(truncated or modified)')
    digest, n = hashlib.sha256(), 0
    while n <= expected:
      chunk = f.read(min(1 << 20, expected + 1 - n))
      if not chunk:
        break
      digest.update(chunk)
      n += len(chunk)
  if n != expected or digest.hexdigest() != record['sha256']:
    raise CheckpointError(
        f'{file_path}: sha256 differs from its manifest (modified or '
        'corrupt)')


def _verify_manifest(folder):
  """The manifest of `folder`, its every file checked; else CheckpointError
  (a damaged manifest of any shape is a damaged checkpoint)."""
  path = os.path.join(folder, MANIFEST)
  try:
    manifest = _read_manifest(path)
    _check_manifest_schema(manifest)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint manifest is missing') from None
  except (ValueError, OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: corrupt checkpoint manifest ({e})') from e
  for file_name, record in manifest['files'].items():
    _check_file(os.path.join(folder, file_name), record)
  return manifest


def read_checkpoint(directory, basename='model', n_tasks=None):
  """Reads checkpoint `basename` of `directory` safely: a `Checkpoint` or None.

  Reads the committed folder when there is one (verifying its manifest), else
  plain trax files `directory/basename.*`; `n_tasks` optimizer slot files
  (None: all there are).
  """
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
  if not isinstance(data, dict) or not {'step', 'flat_weights'} <= set(data):
    raise CheckpointError(f'{prefix}.pkl.gz: not a trax checkpoint (no step '
                          'or flat_weights)')
  if isinstance(data.get('flat_weights'), int):
    flat_weights = read_arrays(prefix + '.weights.npy.gz')
  else:  # trax's older format: weights inside the pickle.
    flat_weights = list(data['flat_weights'])
  if 'slots' in data:  # trax's oldest format: one task's slots in the pickle.
    slots_per_task = [data['slots']]
  elif isinstance(data.get('slots_per_task'), int):
    slots = f'{prefix}.opt_slots{{}}.npy.gz'
    if n_tasks is None:  # As many as there are.
      n_tasks = next(i for i in itertools.count()
                     if not os.path.exists(slots.format(i)))
    slots_per_task = [read_arrays(slots.format(i)) for i in range(n_tasks)]
  else:
    slots_per_task = list(data.get('slots_per_task') or [])
  # Every process resumes at process 0's data position: this project's
  # streams count global batches, the same on every process (only process 0
  # commits checkpoints).
  counters_path = os.path.join(path, data_counters_name(0))
  data_counters = None
  if manifest is not None and os.path.exists(counters_path):
    data_counters = safe_unpickle(counters_path, compressed=False)
  return Checkpoint(step=int(data['step']), data=data,
                    flat_weights=flat_weights, slots_per_task=slots_per_task,
                    data_counters=data_counters, path=path, manifest=manifest)


def checkpoint_location(path):
  """(directory, checkpoint name) that `path` means: the one place that says.

  An output dir means its `model` checkpoint (the one a run resumes from); a
  file `dir/name.pkl.gz` (top-level, inside a committed folder, or written by
  trax, e.g. a released checkpoint) means checkpoint `name` in `dir`. The
  suffix may be left off (trax's `Loop.load_checkpoint` names 'model').
  """
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    return path, 'model'
  directory, name = os.path.split(path)
  return directory, name.removesuffix('.pkl.gz')


def read_checkpoint_at(path, n_tasks=0):
  """`read_checkpoint` of what `path` means (`checkpoint_location`), or
  FileNotFoundError."""
  directory, basename = checkpoint_location(path)
  ckpt = read_checkpoint(directory, basename, n_tasks=n_tasks)
  if ckpt is None:
    raise FileNotFoundError(f'no checkpoint {basename}.pkl.gz in {directory}; '
                            'has the run saved one yet?')
  return ckpt


LOCK = 'LOCK'
_LOCKS = {}  # realpath of an output dir -> fd of this process's flock on it


def _open_lock_file(path):
  """An fd of lock file `path`, created if missing; never through a link, and
  not a directory, FIFO or device (ValueError in one line)."""
  flags = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK |
           getattr(os, 'O_CLOEXEC', 0))
  try:
    fd = os.open(path, flags, 0o644)
  except OSError as e:
    if e.errno not in (errno.ELOOP, errno.EISDIR):
      raise
    kind = 'a symbolic link' if e.errno == errno.ELOOP else 'a directory'
    raise ValueError(_planted_lock(path, kind)) from None
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise ValueError(_planted_lock(path, hg_files.kind_of(mode)))
  return fd


def _planted_lock(path, kind):
  return (f'{path} is {kind}, where the trainer keeps its lock file; move it '
          'away or remove it (nothing was written through it), or pass another '
          '--output_dir.')


def lock_output_dir(directory):
  """Makes this process the only trainer of `directory` (created) until it exits.

  An exclusive `flock` on `directory/checkpoints/LOCK`, which the OS drops
  when the process dies (even by `kill -9`): a stale lock never blocks a
  restart. Else OutputDirInUseError naming the holder's pid and host.
  """
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f'output dir {directory} is a file, not a directory; '
                     'pass a directory (it is created if missing).')
  lock_dir = os.path.join(directory, CHECKPOINTS_DIR)
  os.makedirs(lock_dir, exist_ok=True)
  key = os.path.realpath(directory)
  if key in _LOCKS:
    return
  fd = _open_lock_file(os.path.join(lock_dir, LOCK))
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
