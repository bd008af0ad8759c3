"""One trainer per output dir: an OS lock that a crash can never leave stale."""

import errno
import fcntl
import os
import socket
import stat
import time

from trax_hourglass import files as hg_files
from trax_hourglass.checkpoints.store import CHECKPOINTS_DIR


class OutputDirInUseError(ValueError):
  """Another live process trains into the same output dir."""


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
