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

Reading it back (`reader`) survives a damaged pointer or folder; the
MANIFEST.json check is `manifest`, the one-trainer lock `lock`.
"""

import hashlib
import json
import os
import secrets
import shutil
import time

import jax

from trax_hourglass import files as hg_files
from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.manifest import FORMAT
from trax_hourglass.checkpoints.manifest import MANIFEST
from trax_hourglass.checkpoints.manifest import verify_manifest as _verify_manifest

CHECKPOINTS_DIR = 'checkpoints'
CURRENT = 'CURRENT'
_TMP_PREFIX = hg_files.TMP_MARK


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


def checkpoint_root(directory, basename):
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
  root = checkpoint_root(directory, basename)
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
