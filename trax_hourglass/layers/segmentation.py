"""SentencePiece unigram segmentation of byte windows, on the host.

`unigram_boundaries` is the training TARGET of the boundary predictor of
`HourglassLM(boundaries='unigram')` (the model calls it through
`jax.pure_callback`): the model's own boundaries are the predictor's hard
decisions on positions <= t, so they stay causal while this target is not.

Why a target and not the boundaries themselves: a unigram segmentation is the
most likely split of a whole string, so where a piece ends depends on the bytes
after it ('walk|ing', but 'walk|ers' or 'walks|'), and no rule that reads only
the bytes so far gives the tokenizer's pieces. Used as the target of a
predictor (as the authors do) the later bytes only shape the loss, as the
next-byte targets do, never an output. The lookahead is bounded: the text is
segmented word by word (a word: the bytes between two whitespace bytes), so a
target depends on bytes up to the end of its word only, and every whitespace
byte ends a segment as in `boundaries='whitespace'`.

Positions are the model's input positions after its input shift: position t
holds byte x_{t-1} and position 0 holds the shifted-in 0, which is no text: it
joins the first piece (its target is False, as 'whitespace' gives it).
"""

import functools
import os
import re

import numpy as np

# The bytes that separate words: ASCII space, tab, CR, LF (the default
# `boundary_tokens` of the whitespace boundaries).
WHITESPACE = b' \t\r\n'
_WORDS = re.compile(rb'[^' + re.escape(WHITESPACE) + rb']+')
# Bytes that are not valid UTF-8, after decoding with 'surrogateescape'.
_INVALID = re.compile('[\udc80-\udcff]')
_WORD_CACHE = 1 << 16  # Distinct words remembered per model (the text repeats).


@functools.lru_cache(maxsize=8)
def sentencepiece_model(model_path):
  """The SentencePiece model at `model_path`, or ValueError in one line.

  The file is a serialized protobuf (`ModelProto`), parsed as data: loading it
  runs no code. Any SentencePiece model segments (unigram as the authors, or
  BPE).
  """
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        "boundaries='unigram' needs the sentencepiece package: pip install "
        "'trax_hourglass[unigram]'.") from None
  if not os.path.isfile(model_path):
    raise ValueError(f'sentencepiece_model {model_path!r}: no such file; pass '
                     'the path of a SentencePiece .model file (e.g. written '
                     'by spm.SentencePieceTrainer).')
  try:
    return sentencepiece.SentencePieceProcessor(model_file=model_path)
  except (RuntimeError, OSError) as e:
    raise ValueError(
        f'sentencepiece_model {model_path!r} is not a SentencePiece model '
        f'({str(e).splitlines()[0]}); pass a .model file written by '
        'spm.SentencePieceTrainer.') from None


@functools.lru_cache(maxsize=8)
def _word_pieces(model_path):
  """word (bytes) -> byte offsets where its pieces end, cached per model."""
  model = sentencepiece_model(model_path)

  def valid_ends(text):
    # Offsets index the UTF-8 input. Pieces of no bytes (a lone dummy-prefix
    # piece) end nothing; bytes the normalizer drops join the next piece.
    return {p.end for p in model.encode(text, return_type='proto').pieces
            if p.end > p.begin}

  @functools.lru_cache(maxsize=_WORD_CACHE)
  def pieces(word):
    text = word.decode('utf-8', 'surrogateescape')
    if not _INVALID.search(text):
      ends = valid_ends(word)
    else:  # Each byte that is not valid UTF-8 is a piece of its own.
      ends, offset = set(), 0
      for run in re.split('([\udc80-\udcff])', text):
        size = len(run.encode('utf-8', 'surrogateescape'))
        if _INVALID.fullmatch(run):
          ends.add(offset + 1)
        elif run:
          ends.update(offset + e for e in valid_ends(run.encode('utf-8')))
        offset += size
    ends.discard(len(word))  # The word's end is its whitespace's (below).
    return sorted(ends)

  return pieces


def unigram_boundaries(tokens, model_path):
  """Where SentencePiece's pieces end: the unigram boundary TARGET.

  Args:
    tokens: (batch, len) ints in 0..255, the model's input positions after its
      shift (position t holds byte x_{t-1}; position 0 holds the shifted-in 0).
    model_path: path of a SentencePiece .model file.

  Returns:
    (batch, len) bool: True at t when a piece ends after position t. Each row
    is split into words at whitespace bytes (space, tab, CR, LF); every
    whitespace byte ends a segment (it closes the word before it, as
    `boundaries='whitespace'`), and inside a word a piece ends where
    SentencePiece's segmentation of that word ends one (the word's last piece
    ends at the whitespace after it, or runs on to the window's end). Bytes that
    are not valid UTF-8 (a window cut inside a character, binary data) are one
    piece each. Position 0 joins the first piece. NOT causal within a word:
    use it as a target only (see the module docstring).

  Raises:
    ValueError: (one line) the model file is missing or not a SentencePiece
      model, or `tokens` is not a (batch, len) array of bytes.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or (tokens.size and (tokens.min() < 0 or
                                           tokens.max() > 255)):
    raise ValueError(f'unigram_boundaries needs (batch, len) byte ids 0..255, '
                     f'got shape {tokens.shape}' + (
                         f' with values {tokens.min()}..{tokens.max()}'
                         if tokens.size else '') + '.')
  pieces = _word_pieces(model_path)
  ends = np.zeros(tokens.shape, bool)
  for row, row_ends in zip(tokens.astype(np.uint8), ends):
    text = row[1:].tobytes()  # Position 1 + i holds byte i of the text.
    row_ends[1:] = np.isin(row[1:], np.frombuffer(WHITESPACE, np.uint8))
    for word in _WORDS.finditer(text):
      for end in pieces(word.group()):
        row_ends[word.start() + end] = True  # Byte start+end-1, position +1.
  return ends
