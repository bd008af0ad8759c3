"""wiki40b/en language-modelling data, SentencePiece-tokenized, as the paper.

As trax's `hourglass_wiki40b.gin`: each article's text is tokenized with a
SentencePiece model (32k pieces in the paper; its file is passed by path),
cut into chunks of at most `max_length` tokens, padded with 0 to
`max_length` (weights 0 on padding), shuffled (training) and batched.
"""

import os

import gin
import numpy as np

from trax_hourglass.data import streams
from trax_hourglass.data import text


def load_sentencepiece(spm_path):
  """A tensorflow_text SentencepieceTokenizer from a .model file."""
  spm_path = os.path.expanduser(spm_path)
  if not os.path.exists(spm_path):
    raise FileNotFoundError(
        f'SentencePiece model {spm_path} does not exist; pass the path of the '
        '.model file (e.g. a 32k-piece model trained on wiki40b/en) as '
        'wiki40b_inputs.spm_path.')
  import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
  with open(spm_path, 'rb') as f:
    model = f.read()
  try:
    return tf_text.SentencepieceTokenizer(model=model, out_type=np.int32)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{spm_path}: not a SentencePiece model ({e})') from e


def chunks(texts, tokenizer, max_length):
  """Token id arrays of at most `max_length` per chunk of each text."""
  for t in texts:
    ids = np.asarray(tokenizer.tokenize(t)).astype(np.int32)
    for start in range(0, len(ids), max_length):
      piece = ids[start:start + max_length]
      if len(piece):
        yield piece


def _shuffled(items, buffer_size, seed):
  rng = np.random.default_rng(seed)
  buf = []
  for item in items:
    buf.append(item)
    if len(buf) >= buffer_size:
      yield buf.pop(int(rng.integers(len(buf))))
  rng.shuffle(buf)
  yield from buf


def padded_batches(pieces, batch_size, max_length):
  """Batches `(x, x, weights)`: x int32 [batch, max_length], 0-padded."""
  batch = []
  for p in pieces:
    batch.append(p)
    if len(batch) == batch_size:
      x = np.zeros((batch_size, max_length), np.int32)
      for j, q in enumerate(batch):
        x[j, :len(q)] = q
      yield (x, x, (x != 0).astype(np.float32))
      batch = []


def sentencepiece_lm_inputs(texts_fn, spm_path, name, batch_size=8,
                            max_length=2048, eval_batch_size=None,
                            shuffle_buffer=1024, seed=0):
  """trax `Inputs` of SentencePiece-tokenized texts.

  Args:
    texts_fn: split name ('train' or 'eval') -> iterable of str, restartable
      and deterministic (it is called again to resume).
    spm_path: the SentencePiece .model file.
    name: the data's name (for the resumable positions).
    batch_size, eval_batch_size: chunks per batch.
    max_length: tokens per chunk (2048 in the paper).
    shuffle_buffer: chunks in the training shuffle buffer.
    seed: shuffle seed.

  Returns:
    `trax.data.inputs.Inputs`; batches `(x, x, weights)`, x int32
    [batch, max_length], weights 0 on padding.
  """
  tokenizer = load_sentencepiece(spm_path)
  eval_batch_size = eval_batch_size or batch_size

  def epochs(split, shuffle):
    epoch = 0
    while True:
      pieces = chunks(texts_fn(split), tokenizer, max_length)
      if shuffle:
        pieces = _shuffled(pieces, shuffle_buffer, (seed, epoch))
      yield from pieces
      epoch += 1

  # Multi-host: every process reads the global batches (tokenizing all of
  # them) and keeps its slice (see `streams.process_shard`).
  index, count = streams.process_shard()

  def sliced(split, shuffle, size):
    for batch in padded_batches(epochs(split, shuffle), size * count,
                                max_length):
      yield streams.host_slice(batch, index, size)

  return streams.ResumableInputs(
      lambda: streams.restartable_stream(
          f'{name}/train/L{max_length}/b{batch_size * count}/s{seed}',
          lambda: sliced('train', True, batch_size)),
      lambda: streams.restartable_stream(
          f'{name}/eval/L{max_length}/b{eval_batch_size * count}',
          lambda: sliced('eval', False, eval_batch_size)),
      batch_size, eval_batch_size)


@gin.configurable(module='trax_hourglass')
def wiki40b_inputs(spm_path=gin.REQUIRED, batch_size=8, max_length=2048,
                   eval_batch_size=None, data_dir=None, download=True,
                   shuffle_buffer=1024, seed=0, eval_split='validation'):
  """wiki40b/en from TFDS, SentencePiece-tokenized (see module docstring).

  Args:
    spm_path: the SentencePiece .model file (vocab_size pieces).
    batch_size: chunks per training batch (128 in the paper).
    max_length: tokens per chunk (2048).
    eval_batch_size: chunks per eval batch (8 in the paper).
    data_dir: the TFDS data dir.
    download: let TFDS download and prepare wiki40b/en if missing.
    shuffle_buffer: chunks in the training shuffle buffer.
    seed: shuffle seed.
    eval_split: 'validation' or 'test'.

  Returns:
    `trax.data.inputs.Inputs` as `sentencepiece_lm_inputs`.
  """
  data_dir = text.default_data_dir(data_dir)

  def texts(split):
    tfds_split = 'train' if split == 'train' else eval_split
    for ex in text.tfds_examples('wiki40b/en', tfds_split, data_dir, download):
      yield ex['text'].decode('utf-8')

  return sentencepiece_lm_inputs(texts, spm_path, 'wiki40b_en', batch_size,
                                 max_length, eval_batch_size, shuffle_buffer,
                                 seed)
