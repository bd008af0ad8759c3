"""A byte corpus on every machine: the Python standard library's source.

`stdlib_corpus` concatenates the stdlib's .py files (in sorted order) into
one file in the data dir, written once, so that training and evaluation read
the same bytes by path (`text.stdlib_text_inputs`).
"""

import os

from trax_hourglass import files
from trax_hourglass.data.locations import default_data_dir

# Left out of the stdlib corpus: tests, third-party packages, and generated
# data tables (codec maps, pydoc's topics), which are not code and are so
# repetitive that they would make bits per byte look far better than it is.
_STDLIB_SKIP_DIRS = ('site-packages', 'dist-packages', '__pycache__', 'test',
                     'tests', 'idlelib', 'lib2to3', 'turtledemo', 'encodings',
                     'pydoc_data')
_STDLIB_MAX_FILE_BYTES = 200_000


def stdlib_text_files():
  """The Python standard library's .py files: a corpus on every machine."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  root = sysconfig.get_paths()['stdlib']
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    for f in sorted(filenames):
      path = os.path.join(dirpath, f)
      if f.endswith('.py') and os.path.getsize(path) <= _STDLIB_MAX_FILE_BYTES:
        found.append(path)
  return found


def stdlib_corpus(max_bytes=8_000_000, cache_dir=None):
  """Writes (once) and returns the path of the stdlib corpus file."""
  import sys  # pylint: disable=g-import-not-at-top
  cache_dir = default_data_dir(cache_dir)
  name = (f'python{sys.version_info.major}.{sys.version_info.minor}'
          f'-stdlib-v2-{max_bytes}.txt')
  path = os.path.join(cache_dir, name)
  if not os.path.exists(path):
    parts, n = [], 0
    for f in stdlib_text_files():
      with open(f, 'rb') as src:
        b = src.read()
      parts.append(b)
      n += len(b)
      if n >= max_bytes:
        break
    data = b''.join(parts)[:max_bytes]
    if not data:
      raise FileNotFoundError('found no Python source under the standard '
                              'library path; pass a byte file instead.')
    os.makedirs(cache_dir, exist_ok=True)
    files.write_atomically(path, lambda f: f.write(data), durable=False)
  return path
