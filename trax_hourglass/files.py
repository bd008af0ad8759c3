"""Files in run and data directories: created, never followed; read bounded.

A run or data directory may be shared, or written by someone else: a planted
symlink at a name this package writes must not make it overwrite the link's
target, and a FIFO or device where a file is expected must not hang or feed a
reader forever. So every file is written under a fresh temporary name
(`O_CREAT | O_EXCL | O_NOFOLLOW`) and renamed over its place (a rename
replaces a link, never writes through it), and readers open with `O_NONBLOCK`
and refuse anything but a regular file, reading at most what they expect.
"""

import errno
import os
import secrets
import stat

TMP_MARK = '.tmp-'  # In every temporary name: leftovers are recognisable.

_KINDS = ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
          (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
          (stat.S_ISSOCK, 'a socket'), (stat.S_ISLNK, 'a symbolic link'))


class NotRegularFileError(ValueError):
  """A path that should be a regular file is a link, FIFO, device, ..."""


def kind_of(mode):
  """'a FIFO (named pipe)', ... for an `st_mode`; 'a regular file'."""
  for test, name in _KINDS:
    if test(mode):
      return name
  return 'a regular file' if stat.S_ISREG(mode) else 'not a regular file'


def open_regular(path, follow_links=True):
  """A read-only fd of `path`, which must be a regular file.

  Opened non-blocking (a FIFO cannot hang the open) and checked with fstat (no
  race with a swap); `follow_links=False` also refuses a symlink. Raises
  NotRegularFileError naming what `path` is; FileNotFoundError as `open`.
  """
  flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0)
  if not follow_links:
    flags |= os.O_NOFOLLOW
  try:
    fd = os.open(path, flags)
  except OSError as e:
    if e.errno == errno.ELOOP and not follow_links:
      raise NotRegularFileError(f'{path} is a symbolic link, not a regular '
                                'file') from None
    raise
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise NotRegularFileError(f'{path} is {kind_of(mode)}, not a regular file')
  os.set_blocking(fd, True)
  return fd


def read_bounded(path, limit, follow_links=True):
  """The bytes of regular file `path`, at most `limit` + 1 of them (one more
  than expected tells a caller the file is longer than it should be)."""
  fd = open_regular(path, follow_links)
  with os.fdopen(fd, 'rb') as f:
    return f.read(limit + 1)


def create_new(path, mode=0o644):
  """A binary file object of the new file `path`; never follows a link there
  (FileExistsError if anything, a link included, is at `path`)."""
  flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
           getattr(os, 'O_CLOEXEC', 0))
  return os.fdopen(os.open(path, flags, mode), 'wb')


def temporary_name(path):
  """A fresh name beside `path` for writing it (unguessable, per process)."""
  return f'{path}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}'


def fsync_dir(path):
  fd = os.open(path or '.', os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomically(path, write_fn, durable=True):
  """Writes `path` with `write_fn(binary file object)`: a new temporary file,
  fsynced (`durable`), renamed over `path` (replacing a link there, never
  writing through it). Nothing is left behind on failure."""
  tmp = temporary_name(path)
  try:
    with create_new(tmp) as f:
      write_fn(f)
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  if durable:
    fsync_dir(os.path.dirname(path))
