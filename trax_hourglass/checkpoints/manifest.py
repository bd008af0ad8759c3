"""A checkpoint folder's MANIFEST.json: what `store.commit` wrote, checked.

The manifest names every file of a committed folder with its size and sha256;
`verify_manifest` reads it bounded, checks its shape and every file, so that
a truncated, modified or planted file is a damaged checkpoint, never data.
"""

import hashlib
import json
import os

from trax_hourglass import files as hg_files
from trax_hourglass.checkpoints.format import CheckpointError

FORMAT = 'trax_hourglass.checkpoint/1'
MANIFEST = 'MANIFEST.json'
# A manifest is a few hundred bytes; anything near this is not one.
_MAX_MANIFEST_BYTES = 1 << 20


def manifest_time(folder):
  try:
    return float(read_manifest(os.path.join(folder, MANIFEST)).get('time', 0))
  except Exception:  # pylint: disable=broad-except
    return 0.0  # Damaged: verified (and refused) later.


def read_manifest(path):
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


def check_file(file_path, record):
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


def verify_manifest(folder):
  """The manifest of `folder`, its every file checked; else CheckpointError
  (a damaged manifest of any shape is a damaged checkpoint)."""
  path = os.path.join(folder, MANIFEST)
  try:
    manifest = read_manifest(path)
    _check_manifest_schema(manifest)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: checkpoint manifest is missing') from None
  except (ValueError, OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: corrupt checkpoint manifest ({e})') from e
  for file_name, record in manifest['files'].items():
    check_file(os.path.join(folder, file_name), record)
  return manifest
