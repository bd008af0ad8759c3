"""Tests of trax_hourglass.data on tiny data built here (nothing is downloaded)."""

import hashlib
import io
import os
import struct
import urllib.error
import zipfile

import numpy as np
import pytest

from trax_hourglass import data
from trax_hourglass.data import text
from trax.data import inputs as trax_inputs


@pytest.fixture(autouse=True)
def _fresh_positions():
  trax_inputs.data_counters = {}
  yield
  trax_inputs.data_counters = {}


def _region_file(path, sizes):
  """A byte file whose regions of `sizes` hold bytes 1, 2, 3, ..."""
  with open(path, 'wb') as f:
    for value, size in enumerate(sizes, start=1):
      f.write(bytes([value]) * size)
  return str(path)


def test_byte_file_is_split_90_5_5_and_windows_stay_in_their_split(tmp_path):
  path = _region_file(tmp_path / 'f', [900, 50, 50])
  assert text.byte_file_splits(1000) == {
      'train': (0, 900), 'valid': (900, 950), 'test': (950, 1000)}
  assert text.byte_file_splits(1001)['valid'] == (900, 950)  # floor
  inputs = data.byte_file_inputs(path, batch_size=4, sequence_length=16)
  x, y, w = next(inputs.train_stream(1))
  assert x.shape == (4, 16) and x.dtype == np.int32 and (x == y).all()
  assert (w == 1).all() and w.dtype == np.float32
  assert all((next(inputs.train_stream(1))[0] == 1).all() for _ in range(20))
  assert (next(inputs.eval_stream(1))[0] == 2).all()
  test = data.byte_file_inputs(path, batch_size=2, sequence_length=16,
                               eval_split='test')
  assert (next(test.eval_stream(1))[0] == 3).all()


def test_eval_windows_tile_the_split_in_order(tmp_path):
  path = tmp_path / 'f'
  path.write_bytes(bytes(range(200)) * 5)  # 1000 bytes; valid = [900, 950)
  inputs = data.byte_file_inputs(str(path), batch_size=2, sequence_length=10)
  stream = inputs.eval_stream(1)
  first, second = next(stream)[0], next(stream)[0]
  expected = np.frombuffer(path.read_bytes()[900:950], np.uint8)
  np.testing.assert_array_equal(first.reshape(-1), expected[:20])
  np.testing.assert_array_equal(second.reshape(-1), expected[20:40])
  third = next(stream)[0].reshape(-1)  # 5 windows: wraps after the fifth
  np.testing.assert_array_equal(third, np.concatenate([expected[40:50],
                                                       expected[:10]]))


def test_streams_resume_at_the_saved_position(tmp_path):
  path = tmp_path / 'f'
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000,
                                                     np.uint8).tobytes())
  inputs = data.byte_file_inputs(str(path), batch_size=2, sequence_length=8)
  stream = inputs.train_stream(1)
  for _ in range(3):
    next(stream)
  saved = dict(trax_inputs.data_counters)  # What a checkpoint stores.
  expected = [next(stream)[0] for _ in range(2)]
  # A new process: fresh streams, then the Loop restores the positions.
  trax_inputs.data_counters = {}
  again = data.byte_file_inputs(str(path), batch_size=2, sequence_length=8)
  resumed = again.train_stream(1)
  next(resumed)  # e.g. trax's sample batch, drawn before the checkpoint loads
  trax_inputs.data_counters = dict(saved)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)[0], e)
  # The Inputs' shape peek does not move the position.
  assert inputs.input_shape == (8,)


def test_bad_settings_are_clear_errors(tmp_path):
  path = _region_file(tmp_path / 'f', [90, 5, 5])
  with pytest.raises(ValueError, match='valid split has 5 bytes, fewer than '
                                       'sequence_length=16'):
    data.byte_file_inputs(path, batch_size=2, sequence_length=16)
  with pytest.raises(FileNotFoundError, match='byte file /no/file'):
    data.byte_file_inputs('/no/file')
  with pytest.raises(ValueError, match='split fractions'):
    text.byte_file_splits(100, (0.5, 0.5, 0.5))
  inputs = data.byte_file_inputs(path, batch_size=3, sequence_length=4)
  with pytest.raises(ValueError, match='batch_size=3 cannot be split evenly '
                                       'over 2 devices.*e.g. 2 or 4'):
    inputs.train_stream(2)


def _fake_enwik8(tmp_path, monkeypatch):
  """A small stand-in for enwik8 (the checker is told its size and sha)."""
  regions = [900, 50, 50]
  content = b''.join(bytes([v]) * n for v, n in zip((1, 2, 3), regions))
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('enwik8', content)
  zipped = buf.getvalue()
  monkeypatch.setattr(text, 'ENWIK8_BYTES', 1000)
  monkeypatch.setattr(text, 'ENWIK8_SPLITS', {
      'train': (0, 900), 'valid': (900, 950), 'test': (950, 1000)})
  monkeypatch.setattr(text, 'ENWIK8_ZIP_SHA256',
                      hashlib.sha256(zipped).hexdigest())
  return zipped


def test_enwik8_from_a_local_zip_checked_and_split(tmp_path, monkeypatch):
  zipped = _fake_enwik8(tmp_path, monkeypatch)
  (tmp_path / 'enwik8.zip').write_bytes(zipped)
  inputs = data.enwik8_inputs(batch_size=2, sequence_length=16,
                              data_dir=str(tmp_path), download=False)
  assert (tmp_path / 'enwik8').stat().st_size == 1000  # unzipped beside it
  assert (next(inputs.train_stream(1))[0] == 1).all()
  assert (next(inputs.eval_stream(1))[0] == 2).all()
  # A damaged zip is refused, naming it and the expected checksum.
  (tmp_path / 'enwik8').unlink()
  (tmp_path / 'enwik8.zip').write_bytes(zipped[:-10])
  with pytest.raises(ValueError, match='enwik8.zip: sha256 is .* expected'):
    data.enwik8_path(str(tmp_path), download=False)


def test_enwik8_download_once_or_explain_what_to_fetch(tmp_path, monkeypatch):
  zipped = _fake_enwik8(tmp_path, monkeypatch)
  calls = []

  def fake_urlopen(url, timeout=None):
    del timeout
    calls.append(url)
    return io.BytesIO(zipped)

  monkeypatch.setattr(text.urllib.request, 'urlopen', fake_urlopen)
  assert data.enwik8_path(str(tmp_path)) == str(tmp_path / 'enwik8')
  assert data.enwik8_path(str(tmp_path)) == str(tmp_path / 'enwik8')
  assert calls == ['http://mattmahoney.net/dc/enwik8.zip']  # once

  def offline(url, timeout=None):
    raise urllib.error.URLError('no network')

  monkeypatch.setattr(text.urllib.request, 'urlopen', offline)
  empty = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError) as e:
    data.enwik8_path(empty)
  message = str(e.value)
  assert 'http://mattmahoney.net/dc/enwik8.zip' in message
  assert os.path.join(empty, 'enwik8.zip') in message and 'no network' in message
  with pytest.raises(FileNotFoundError, match='downloading is turned off'):
    data.enwik8_path(empty, download=False)


def test_real_enwik8_size_is_checked(tmp_path):
  with open(tmp_path / 'enwik8', 'wb') as f:
    f.write(b'x' * 10)
  with pytest.raises(ValueError, match='has 10 bytes, enwik8 has 100,000,000'):
    data.enwik8_path(str(tmp_path))


def test_images_flatten_in_raster_order_with_interleaved_rgb(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (10, 4, 4, 3), np.uint8)
  test = rng.integers(0, 256, (3, 4, 4, 3), np.uint8)
  path = tmp_path / 'images.npz'
  np.savez(path, train_images=train, test_images=test)
  flat = data.flatten_images(train)
  assert flat.shape == (10, 48) and flat.dtype == np.int32
  np.testing.assert_array_equal(flat[0, :3], train[0, 0, 0])  # pixel (0,0) RGB
  np.testing.assert_array_equal(flat[0, 3:6], train[0, 0, 1])  # then (0,1)
  np.testing.assert_array_equal(flat[0, 12:15], train[0, 1, 0])  # next row
  inputs = data.npz_image_inputs(str(path), batch_size=5, eval_batch_size=3)
  stream = inputs.train_stream(1)
  epoch = np.concatenate([next(stream)[0] for _ in range(2)])
  # One epoch shows every training image once, in a shuffled order.
  assert sorted(map(bytes, epoch.astype(np.uint8))) == sorted(
      map(bytes, flat.astype(np.uint8)))
  x, y, w = next(inputs.eval_stream(1))
  np.testing.assert_array_equal(x, data.flatten_images(test))
  assert (x == y).all() and w.shape == (3, 48)
  np.savez(tmp_path / 'bad.npz', images=train)
  with pytest.raises(ValueError, match="needs \\['train_images', "
                                       "'test_images'\\]"):
    data.npz_image_inputs(str(tmp_path / 'bad.npz'))


def test_tfds_images_offline_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='dataset_name must be one of'):
    data.tfds_image_inputs('mnist')
  with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
    data.tfds_image_inputs('cifar10', data_dir=str(tmp_path), download=False)


def _varint(n):
  out = b''
  while True:
    b, n = n & 0x7f, n >> 7
    if not n:
      return out + bytes([b])
    out += bytes([b | 0x80])


def _field(num, wire, payload):
  key = _varint((num << 3) | wire)
  if wire == 0:
    return key + _varint(payload)
  if wire == 5:
    return key + payload
  return key + _varint(len(payload)) + payload


def _char_sentencepiece_model(chars):
  """A SentencePiece CHAR model proto: <unk>=0, <s>=1, </s>=2, chars from 3."""
  def piece(s, typ):
    return (_field(1, 2, s.encode()) + _field(2, 5, struct.pack('<f', -1.0)) +
            _field(3, 0, typ))
  pieces = [piece('<unk>', 2), piece('<s>', 3), piece('</s>', 3)]
  pieces += [piece(c, 1) for c in chars]
  trainer_spec = _field(3, 0, 4) + _field(4, 0, len(pieces))  # CHAR model
  normalizer = (_field(1, 2, b'identity') + _field(3, 0, 0) + _field(4, 0, 0) +
                _field(5, 0, 1))
  return (b''.join(_field(1, 2, p) for p in pieces) +
          _field(2, 2, trainer_spec) + _field(3, 2, normalizer))


def test_sentencepiece_text_is_chunked_padded_and_resumable(tmp_path):
  spm = tmp_path / 'chars.model'
  spm.write_bytes(_char_sentencepiece_model('\u2581abcdefghij'))
  articles = {'train': ['abcdefghij' * 3, 'abc', 'j'],
              'eval': ['aaaa bbbb cccc']}
  inputs = data.sentencepiece_lm_inputs(
      lambda split: iter(articles[split]), str(spm), 'test', batch_size=2,
      max_length=8, shuffle_buffer=1)
  x, y, w = next(inputs.eval_stream(1))
  # 'aaaa bbbb cccc' is 14 pieces: one full chunk of 8, then 6 and 2 pads.
  np.testing.assert_array_equal(x[0], [4, 4, 4, 4, 3, 5, 5, 5])
  np.testing.assert_array_equal(x[1], [5, 3, 6, 6, 6, 6, 0, 0])
  np.testing.assert_array_equal(w[1], [1, 1, 1, 1, 1, 1, 0, 0])
  stream = inputs.train_stream(1)
  next(stream)
  saved = dict(trax_inputs.data_counters)
  expected = [next(stream)[0] for _ in range(3)]
  trax_inputs.data_counters = dict(saved)  # as after loading a checkpoint
  for e in expected:
    np.testing.assert_array_equal(next(stream)[0], e)
  with pytest.raises(FileNotFoundError, match='SentencePiece model /no.model'):
    data.sentencepiece_lm_inputs(lambda s: [], '/no.model', 'x')


def test_stdlib_corpus_needs_no_download(tmp_path):
  inputs = data.stdlib_text_inputs(batch_size=2, sequence_length=32,
                                    max_bytes=200_000, cache_dir=str(tmp_path))
  x = next(inputs.train_stream(1))[0]
  assert x.shape == (2, 32) and x.max() < 256
  corpus = os.listdir(tmp_path)
  assert len(corpus) == 1 and (tmp_path / corpus[0]).stat().st_size == 200_000
