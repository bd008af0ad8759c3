"""Byte-level language-modelling data: enwik8 and any byte file.

Every example is a window of `sequence_length` raw bytes (tokens 0..255, so
vocab_size 256), given to trax as `(inputs, targets, weights)` with inputs ==
targets: the LM shifts its inputs right itself. Training windows start at
random offsets of the train split (a new draw per batch, fixed by the seed and
the batch's position, so a resumed run reads the same batches); evaluation
windows tile the validation (or test) split in order and wrap around.

enwik8 (the first 10^8 bytes of a 2006 English Wikipedia XML dump) is split as
in the paper and trax: bytes [0, 90M) train, [90M, 95M) valid, [95M, 100M)
test. Any other byte file is split 90/5/5 by length: [0, floor(0.9 n)),
[floor(0.9 n), floor(0.95 n)), [floor(0.95 n), n).
"""

import hashlib
import os
import shutil
import stat
import urllib.error
import urllib.request
import zipfile

import gin
import numpy as np

from trax_hourglass import files
from trax_hourglass.data import streams
# pylint: disable=unused-import,g-importing-member
# Their homes are `locations` and `stdlib_corpus`; also importable from here,
# where they lived before.
from trax_hourglass.data.locations import default_data_dir
from trax_hourglass.data.locations import set_default_data_dir
from trax_hourglass.data.locations import tfds_examples
from trax_hourglass.data.stdlib_corpus import stdlib_corpus
from trax_hourglass.data.stdlib_corpus import stdlib_text_files
# pylint: enable=unused-import,g-importing-member

ENWIK8_URL = 'http://mattmahoney.net/dc/enwik8.zip'
ENWIK8_ZIP_BYTES = 36_445_475
ENWIK8_ZIP_SHA256 = (
    '547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc')
ENWIK8_BYTES = 100_000_000
# sha256 of the unzipped `enwik8`; None: the unzipped bytes are checked by the
# zip's sha256 (above), its CRC-32 and ENWIK8_BYTES.
ENWIK8_SHA256 = None
ENWIK8_SPLITS = {'train': (0, 90_000_000), 'valid': (90_000_000, 95_000_000),
                 'test': (95_000_000, 100_000_000)}
SPLIT_NAMES = ('train', 'valid', 'test')

def _offline_help(data_dir, reason, zip_sha256):
  return (f'enwik8 is not in {data_dir} and {reason}. Fetch {ENWIK8_URL} '
          f'({ENWIK8_ZIP_BYTES:,} bytes, sha256 {zip_sha256}) and put '
          f'it, or the `enwik8` file unzipped from it ({ENWIK8_BYTES:,} bytes), '
          f'at {os.path.join(data_dir, "enwik8.zip")} (or .../enwik8), or pass '
          'another directory as --data_dir / enwik8_inputs.data_dir.')


def _sha256(path):
  with os.fdopen(files.open_regular(path), 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _check_zip(zip_path, expected):
  digest = _sha256(zip_path)
  if digest != expected:
    raise ValueError(
        f'{zip_path}: sha256 is {digest}, expected {expected} (the '
        f'canonical {ENWIK8_URL}); the file is damaged or not enwik8.zip. '
        'Delete it and fetch it again.')


def _publish(tmp, path, check):
  """Renames the finished temporary file `tmp` to `path` once `check(tmp)`
  passes; removes `tmp` whatever happens. Processes preparing the same file
  at once each write their own `tmp`: every rename puts a whole, checked file
  in place, and a reader keeps the one it opened."""
  try:
    check(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def _download(url, path, zip_sha256):
  """Downloads `url` to `path`, checked against `zip_sha256` before it gets
  its name (via a temporary name of this process: never a partial file)."""
  tmp = files.temporary_name(path)
  try:
    with urllib.request.urlopen(url, timeout=60) as response, \
        files.create_new(tmp) as f:
      shutil.copyfileobj(response, f, 1 << 20)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise
  _publish(tmp, path, lambda t: _check_zip(t, zip_sha256))


def _unzip(zip_path, member, path, n_bytes, sha256):
  """Unzips `member` of `zip_path` to `path`, checked (size, the zip's CRC-32,
  `sha256` unless None) before it gets its name."""
  tmp = files.temporary_name(path)
  digest, n = hashlib.sha256(), 0
  try:
    with zipfile.ZipFile(zip_path) as z, z.open(member) as src, \
        files.create_new(tmp) as dst:
      for chunk in iter(lambda: src.read(1 << 20), b''):  # Checks the CRC.
        digest.update(chunk)
        n += len(chunk)
        dst.write(chunk)
      dst.flush()
      os.fsync(dst.fileno())
  except BaseException as e:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    if isinstance(e, (zipfile.BadZipFile, KeyError)):
      raise ValueError(f'{zip_path}: cannot unzip {member} ({e}); delete it '
                       'and fetch it again.') from e
    raise

  def check(_):
    if n != n_bytes or (sha256 is not None and digest.hexdigest() != sha256):
      raise ValueError(
          f'{zip_path}: {member} unzips to {n:,} bytes with sha256 '
          f'{digest.hexdigest()}, expected {n_bytes:,} bytes'
          + (f' with sha256 {sha256}' if sha256 else '') +
          '; delete the zip and fetch it again.')
  _publish(tmp, path, check)


def enwik8_path(data_dir=None, download=True, sha256=None, zip_sha256=None,
                n_bytes=None):
  """Path of the unzipped 10^8-byte `enwik8` file, preparing it if needed.

  Looks for `enwik8`, then `enwik8.zip` (checked against its sha256 and
  unzipped beside it), in `data_dir` (`default_data_dir`); with `download`,
  fetches the zip once. Else FileNotFoundError saying what to fetch and where
  to put it; ValueError for a damaged file. Downloads and unzips go to
  temporary names of this process and are checked before they are renamed
  into place, so processes preparing one data dir at once (every host of a
  multi-host run) all end with the same whole file.

  Args:
    data_dir: where the files are (or go).
    download: fetch the zip if missing.
    sha256: of the unzipped file, checked when it is unzipped and when it is
      found (default ENWIK8_SHA256; when that is None, the zip's sha256 and
      CRC-32 vouch for the unzipped bytes).
    zip_sha256: of the zip (default ENWIK8_ZIP_SHA256).
    n_bytes: of the unzipped file (default ENWIK8_BYTES).
  """
  sha256 = sha256 or ENWIK8_SHA256
  zip_sha256 = zip_sha256 or ENWIK8_ZIP_SHA256
  n_bytes = n_bytes or ENWIK8_BYTES
  data_dir = default_data_dir(data_dir)
  raw = os.path.join(data_dir, 'enwik8')
  zip_path = os.path.join(data_dir, 'enwik8.zip')
  if not os.path.exists(raw):
    if not os.path.exists(zip_path):
      if not download:
        raise FileNotFoundError(_offline_help(
            data_dir, 'downloading is turned off', zip_sha256))
      os.makedirs(data_dir, exist_ok=True)
      try:
        _download(ENWIK8_URL, zip_path, zip_sha256)
      except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(_offline_help(
            data_dir, f'downloading it failed ({e})', zip_sha256)) from e
    else:
      _check_zip(zip_path, zip_sha256)
    _unzip(zip_path, 'enwik8', raw, n_bytes, sha256)
  size = os.path.getsize(raw)
  if size != n_bytes:
    raise ValueError(f'{raw}: has {size:,} bytes, enwik8 has {n_bytes:,}; '
                     'delete it (and enwik8.zip) and fetch it again, or pass '
                     'a partial file with byte_file_inputs.path instead.')
  if sha256 is not None and _sha256(raw) != sha256:
    raise ValueError(f'{raw}: sha256 differs from enwik8\'s ({sha256}); '
                     'delete it and fetch it again.')
  return raw


def byte_file_splits(n_bytes, fractions=(0.9, 0.05, 0.05)):
  """Split boundaries {name: (start, end)} of a byte file of `n_bytes`."""
  if len(fractions) != 3 or any(f < 0 for f in fractions) or (
      abs(sum(fractions) - 1.0) > 1e-6):
    raise ValueError(f'split fractions must be 3 non-negative numbers adding '
                     f'up to 1 (train, valid, test), got {fractions}')
  a = int(np.floor(fractions[0] * n_bytes))
  b = int(np.floor((fractions[0] + fractions[1]) * n_bytes))
  return {'train': (0, a), 'valid': (a, b), 'test': (b, n_bytes)}


def load_bytes(path):
  """The file's bytes as a read-only uint8 array (memory-mapped)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'byte file {path} does not exist')
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    raise ValueError(f'byte file {path} is {files.kind_of(mode)}, not a '
                     'regular file; pass a file of bytes.')
  if os.path.getsize(path) == 0:
    raise ValueError(f'byte file {path} is empty')
  return np.memmap(path, dtype=np.uint8, mode='r')


def _split(data, bounds, split, sequence_length, path):
  if split not in bounds:
    raise ValueError(f'split must be one of {SPLIT_NAMES}, got {split!r}')
  start, end = bounds[split]
  if end - start < sequence_length:
    raise ValueError(
        f'{path}: the {split} split has {end - start:,} bytes, fewer than '
        f'sequence_length={sequence_length}; use a shorter sequence_length '
        'or a larger file.')
  return data[start:end]


def train_batches(data, batch_size, sequence_length, seed, shard=(0, 1)):
  """i -> batch of random windows of `data` (a function of seed and i).

  With `shard=(index, count)` the global batch has `batch_size * count`
  windows and this is slice `index` of it (see `streams.process_shard`).
  """
  n_starts = len(data) - sequence_length + 1
  index, count = shard
  def batch(i):
    starts = streams.rng_for(seed, i).integers(0, n_starts, batch_size * count)
    starts = starts[index * batch_size:(index + 1) * batch_size]
    x = np.stack([data[s:s + sequence_length] for s in starts]).astype(np.int32)
    return (x, x, np.ones(x.shape, np.float32))
  return batch


def eval_batches(data, batch_size, sequence_length, shard=(0, 1)):
  """i -> batch of consecutive windows tiling `data` in order, wrapping.

  `shard`: as in `train_batches`.
  """
  n_windows = len(data) // sequence_length
  index, count = shard
  def batch(i):
    idx = (np.arange(batch_size) + index * batch_size +
           i * batch_size * count) % n_windows
    x = np.stack([data[j * sequence_length:(j + 1) * sequence_length]
                  for j in idx]).astype(np.int32)
    return (x, x, np.ones(x.shape, np.float32))
  return batch


def byte_lm_inputs(data, bounds, name, batch_size, sequence_length,
                   eval_batch_size=None, seed=0, eval_split='valid',
                   path='<bytes>'):
  """trax `Inputs` over `data` (uint8) split by `bounds`: `(x, x, ones)`, x int32
  [batch, sequence_length]."""
  eval_batch_size = eval_batch_size or batch_size
  train = _split(data, bounds, 'train', sequence_length, path)
  held_out = _split(data, bounds, eval_split, sequence_length, path)
  # Every byte, once, now: not hours into training at the first odd byte.
  streams.check_token_range(train, f'{path} (train split)')
  streams.check_token_range(held_out, f'{path} ({eval_split} split)')
  key = f'{name}/L{sequence_length}/s{seed}'

  # Positions count global batches (b: global batch size), the same on every
  # process; each reads its slice.
  shard = streams.process_shard()
  return streams.ResumableInputs(
      lambda: streams.resumable_stream(
          f'{key}/train/b{batch_size * shard[1]}',
          train_batches(train, batch_size, sequence_length, seed, shard), path),
      lambda: streams.resumable_stream(
          f'{key}/{eval_split}/b{eval_batch_size * shard[1]}',
          eval_batches(held_out, eval_batch_size, sequence_length, shard),
          path),
      batch_size, eval_batch_size)


@gin.configurable(module='trax_hourglass')
def enwik8_inputs(batch_size=8, sequence_length=2048, eval_batch_size=None,
                  data_dir=None, download=True, seed=0, eval_split='valid'):
  """enwik8 byte-level LM data (90M/5M/5M bytes), as trax `Inputs`.

  Args:
    batch_size: training windows per batch (a multiple of the device count);
      per process in multi-host training, where the global batch is
      batch_size times the number of processes.
    sequence_length: bytes per window (2048 in the paper).
    eval_batch_size: windows per eval batch (default batch_size), per
      process as batch_size.
    data_dir: directory with `enwik8` or `enwik8.zip` (see `enwik8_path`).
    download: fetch enwik8.zip from its canonical address if missing.
    seed: seed of the training windows' offsets.
    eval_split: 'valid' or 'test'.

  Returns:
    `trax.data.inputs.Inputs`; batches `(x, x, ones)`, x int32
    [batch, sequence_length] with bytes 0..255.
  """
  path = enwik8_path(data_dir, download)
  return byte_lm_inputs(load_bytes(path), ENWIK8_SPLITS, 'enwik8', batch_size,
                        sequence_length, eval_batch_size, seed, eval_split,
                        path)


@gin.configurable(module='trax_hourglass')
def byte_file_inputs(path=gin.REQUIRED, batch_size=8, sequence_length=2048,
                     eval_batch_size=None, splits=(0.9, 0.05, 0.05), seed=0,
                     eval_split='valid'):
  """Byte-level LM data from any file (e.g. a head of enwik8), split 90/5/5.

  Args:
    path: the file.
    batch_size, sequence_length, eval_batch_size, seed, eval_split: as in
      `enwik8_inputs`.
    splits: fractions of the file's length for train, valid, test.

  Returns:
    `trax.data.inputs.Inputs` as `enwik8_inputs`.
  """
  path = os.path.expanduser(path)
  data = load_bytes(path)
  name = 'bytes/' + os.path.basename(path)
  return byte_lm_inputs(data, byte_file_splits(len(data), splits), name,
                        batch_size, sequence_length, eval_batch_size, seed,
                        eval_split, path)


@gin.configurable(module='trax_hourglass')
def stdlib_text_inputs(batch_size=8, sequence_length=256, eval_batch_size=None,
                       max_bytes=8_000_000, seed=0, cache_dir=None):
  """Byte-level LM data from the Python standard library's source, no download.

  The .py files under `sysconfig`'s stdlib path (tests and site-packages
  left out), in sorted order, concatenated up to `max_bytes` and split 90/5/5
  like any byte file. The corpus is written once to `cache_dir` (default the
  data dir) so that evaluation can read the same bytes by path.

  Returns:
    `trax.data.inputs.Inputs` as `enwik8_inputs`.
  """
  path = stdlib_corpus(max_bytes, cache_dir)
  return byte_file_inputs(path, batch_size, sequence_length, eval_batch_size,
                          (0.9, 0.05, 0.05), seed)
