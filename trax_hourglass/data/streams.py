"""Resumable batch streams: the data position is part of every checkpoint.

A stream here is a pure function of its position: batch i is `batch_fn(i)`. The
position lives in trax's `trax.data.inputs.data_counters[name]`, which the Loop
saves with each checkpoint (atomically, see `trax_hourglass.checkpoints`) and
restores when it resumes, so a resumed run reads exactly the batches the
uninterrupted run would have read.

Token ids must lie in [0, vocab_size) of the model: a model's embedding
lookup does not check them (it clamps, as trax's), so an id outside would
train silently on the wrong token. Once the trainer has told `set_vocab_size`
the model's, every batch is checked, and an id outside is a ValueError that
names the data and the id.
"""

import itertools

import numpy as np
from trax.data import inputs as trax_inputs


_VOCAB_SIZE = [None]


def set_vocab_size(vocab_size):
  """Makes every stream check its token ids against `vocab_size` (None: not)."""
  _VOCAB_SIZE[0] = None if vocab_size is None else int(vocab_size)


def check_token_range(tokens, source, vocab=None):
  """Raises ValueError naming `source` if an id in `tokens` is not in [0, vocab)
  (default: the `set_vocab_size` one)."""
  vocab = vocab or _VOCAB_SIZE[0]
  if vocab is None or not np.size(tokens):
    return
  low, high = int(np.min(tokens)), int(np.max(tokens))
  if low < 0 or high >= vocab:
    raise ValueError(
        f'{source}: holds token id {low if low < 0 else high}, outside the '
        f"model's vocabulary [0, {vocab}); use a model with vocab_size >= "
        f'{max(high + 1, vocab)} (256 for bytes and images), or data whose '
        f'ids are below {vocab}.')


def resumable_stream(name, batch_fn, source=None):
  """Yields `batch_fn(i)` (deterministic) for i = 0, 1, ..., from the saved position.

  `name` is the stream's key in `trax.data.inputs.data_counters`, unique per
  stream of a run (e.g. 'enwik8/train/b8/n2048'); `source` (default `name`)
  names the data in the token-range error.
  """
  return _stream(name, lambda i: map(batch_fn, itertools.count(i)),
                 source or name)


def process_shard():
  """`(index, count)`: this process's place among the training processes.

  Each reads its slice (`batch_size` examples) of every global batch of
`batch_size * count`, which is the same however many processes share it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def host_slice(batch, index, per_host):
  """Process `index`'s `per_host` examples of a global `batch` (a tuple)."""
  return tuple(x[index * per_host:(index + 1) * per_host] for x in batch)


def check_divisible(batch_size, n_devices, what='batch_size'):
  """Raises a clear ValueError unless `n_devices` divides `batch_size`."""
  if batch_size < 1:
    raise ValueError(f'{what} must be positive, got {batch_size}')
  if batch_size % n_devices:
    lower = batch_size - batch_size % n_devices
    upper = lower + n_devices
    options = f'{lower} or {upper}' if lower else f'{upper}'
    raise ValueError(
        f'{what}={batch_size} cannot be split evenly over {n_devices} devices '
        f'(data parallelism gives each device {what}/{n_devices} examples); '
        f'use a multiple of {n_devices}, e.g. {options}.')


def rng_for(seed, *index):
  """A numpy Generator determined by (seed, index...): same batch on resume."""
  return np.random.default_rng([int(seed)] + [int(i) for i in index])


def restartable_stream(name, make_iterator):
  """Yields the batches of `make_iterator()` (deterministic), from the saved position.

  For sources without random access (TFDS text): after a checkpoint is loaded
  the source is restarted and the batches before the position skipped.
  """
  return _stream(name,
                 lambda i: itertools.islice(make_iterator(), i, None), name)


def _stream(name, iterator_from, source):
  """Batches of `iterator_from(position)`, counted in `data_counters[name]`.

  The counter is read on every batch (not captured): the Loop replaces that
  dict when it loads a checkpoint after the streams were made.
  """
  it, pos = None, None
  while True:
    i = trax_inputs.data_counters.get(name, 0)
    if i != pos:
      it = iterator_from(i)
    trax_inputs.data_counters[name] = pos = i + 1
    batch = next(it)
    check_token_range(batch[0], source)
    yield batch


class ResumableInputs(trax_inputs.Inputs):
  """trax `Inputs` of two streams whose shape peek does not move the data position.

  The streams are functions of nothing; trax asks for them per device count,
  which must divide their batch sizes. trax's `Inputs.__init__` draws one batch
  to learn the shapes; the positions are put back after it.
  """

  def __init__(self, train_stream, eval_stream, batch_size, eval_batch_size):  # pylint: disable=super-init-not-called
    def divided(stream, size, what):  # trax asks per device count.
      def stream_fn(n_devices):
        check_divisible(size, n_devices, what)
        return stream()
      return stream_fn
    self._train_stream = divided(train_stream, batch_size, 'batch_size')
    self._eval_stream = divided(eval_stream, eval_batch_size, 'eval_batch_size')
    self._train_eval_stream = self._train_stream
    saved = dict(trax_inputs.data_counters)
    example = next(self._train_stream(1))
    trax_inputs.data_counters = saved
    self._input_shape = tuple(example[0].shape)[1:]
    self._input_dtype = example[0].dtype
    self._target_shape = tuple(example[-1].shape)[1:]
    self._target_dtype = example[-1].dtype
    self._example_shape = [x.shape for x in example]
    self._example_dtype = [x.dtype for x in example]
