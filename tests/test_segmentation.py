"""SentencePiece unigram boundary targets (trax_hourglass/layers/segmentation.py).

A tiny unigram model is trained here on a few KB of made-up text (nothing is
fetched); the targets are checked against SentencePiece's own segmentation of
each word, at the model's input positions (position t holds byte t-1).
"""

import io

import numpy as np
import pytest

from trax_hourglass.layers import segmentation

spm = pytest.importorskip('sentencepiece')

WORDS = ('the of and to in a is that for it as was with be by on hourglass '
         'transformer attention shortened layers walking talked running '
         'walks talks runner sequence model bytes').split()


def _text(n_words, seed):
  rng = np.random.default_rng(seed)
  return ' '.join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
  text = _text(2000, seed=0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text[i:i + 200] for i in range(0, len(text), 200)),
      model_writer=model, vocab_size=60, model_type='unigram', num_threads=1,
      minloglevel=2)
  path = tmp_path_factory.mktemp('spm') / 'unigram.model'
  path.write_bytes(model.getvalue())
  return str(path)


def _shifted(texts):
  """(batch, len) input positions: 0, then the bytes of each text."""
  return np.stack([np.frombuffer(b'\0' + t, np.uint8) for t in texts]).astype(
      np.int32)


def _expected(text, model_path):
  """Targets from SentencePiece's string pieces of each word (ASCII text)."""
  model = spm.SentencePieceProcessor(model_file=model_path)
  ends = np.zeros(len(text) + 1, bool)
  offset = 0
  for i, word in enumerate(text.split(' ')):
    lengths = [len(p.lstrip('\u2581'))
               for p in model.encode(word, out_type=str)]
    assert sum(lengths) == len(word)
    for end in np.cumsum(lengths)[:-1]:
      ends[offset + end] = True  # Byte offset+end-1 is at position offset+end.
    offset += len(word) + 1
    if offset <= len(text):
      ends[offset] = True  # The space after the word: position offset.
  return ends


def test_targets_are_sentencepiece_pieces_of_each_word(model_path):
  texts = [_text(60, seed)[:200].encode() for seed in (1, 2, 3)]
  ends = segmentation.unigram_boundaries(_shifted(texts), model_path)
  assert ends.shape == (3, 201) and ends.dtype == bool
  for text, row in zip(texts, ends):
    np.testing.assert_array_equal(row, _expected(text.decode(), model_path))
    assert not row[0]  # The shifted-in 0 joins the first piece.
    # A refinement of the whitespace boundaries: more segments than words.
    spaces = np.frombuffer(b'\0' + text, np.uint8) == ord(' ')
    assert row[spaces].all() and row.sum() > spaces.sum()
  # Rows are segmented independently.
  np.testing.assert_array_equal(
      segmentation.unigram_boundaries(_shifted(texts[1:2]), model_path),
      ends[1:2])


def test_targets_look_ahead_to_the_end_of_the_word_only(model_path):
  text = b'walking talked\trunner\r\nthe  model'
  ends = segmentation.unigram_boundaries(_shifted([text]), model_path)[0]
  for t in range(1, len(text) + 1):
    if text[t - 1] in b' \t\r\n':
      assert ends[t]  # Every whitespace byte ends a segment.
      # Bytes after a whitespace byte decide no target up to it.
      changed = text[:t] + b'zq\xffx' * 3
      np.testing.assert_array_equal(segmentation.unigram_boundaries(
          _shifted([changed]), model_path)[0][:t + 1], ends[:t + 1])
  # Inside a word they do: the segmentation of a whole word is not a
  # segmentation of each of its prefixes (hence a target, not the boundaries).
  differ = [w[:n] for w in WORDS for n in range(1, len(w))
            if not np.array_equal(
                segmentation.unigram_boundaries(
                    _shifted([w[:n].encode()]), model_path)[0],
                segmentation.unigram_boundaries(
                    _shifted([w.encode()]), model_path)[0][:n + 1])]
  assert differ


def test_bytes_that_are_not_utf8_are_pieces_of_their_own(model_path):
  # A window starting inside a character, one ending inside one, binary.
  text = b'\xa9the \xc3\xa9the\xe2\x82 the\xc3'
  ends = segmentation.unigram_boundaries(_shifted([text]), model_path)[0]
  the = segmentation.unigram_boundaries(_shifted([b'the']), model_path)[0][1:]
  # Position i + 1 holds byte i.
  assert ends[1]  # \xa9: a continuation byte without its lead.
  np.testing.assert_array_equal(ends[2:5], the)  # 'the' after it.
  assert ends[5]  # The space.
  assert not ends[6]  # The first byte of U+00E9 (valid) ends no piece.
  assert ends[10] and ends[11]  # 'the' ends where \xe2 (no 3rd byte) starts.
  assert ends[13]  # \x82 ends a piece, at the word's end: the space ends it.
  assert ends[16] and not ends[17]  # A piece \xc3 at the window's end.


def test_errors_are_one_line(model_path, tmp_path):
  tokens = _shifted([b'the model'])
  with pytest.raises(ValueError, match='no such file'):
    segmentation.unigram_boundaries(tokens, str(tmp_path / 'missing.model'))
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model' * 10)
  with pytest.raises(ValueError, match='is not a SentencePiece model') as e:
    segmentation.unigram_boundaries(tokens, str(garbage))
  assert '\n' not in str(e.value)
  for bad in (tokens[0], tokens + 256, tokens - 1):
    with pytest.raises(ValueError, match=r'\(batch, len\) byte ids 0..255'):
      segmentation.unigram_boundaries(bad, model_path)
