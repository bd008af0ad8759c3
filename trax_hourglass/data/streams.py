"""Resumable batch streams: the data position is part of every checkpoint.

A stream here is a pure function of its position: batch i is `batch_fn(i)`. The
position lives in trax's `trax.data.inputs.data_counters[name]`, which the Loop
saves with each checkpoint (atomically, see `trax_hourglass.checkpoints`) and
restores when it resumes, so a resumed run reads exactly the batches the
uninterrupted run would have read. The counter is looked up on every batch
(not captured), because the Loop replaces that dict when it loads a checkpoint
after the streams were made.

Token ids must lie in [0, vocab_size) of the model: a model's embedding
lookup does not check them (it clamps, as trax's), so an id outside would
train silently on the wrong token. Once the trainer has told `set_vocab_size`
the model's, every batch is checked, and an id outside is a ValueError that
names the data and the id.
"""

import numpy as np

from trax_hourglass import compat

compat.apply()

# pylint: disable=g-import-not-at-top,wrong-import-position
from trax.data import inputs as trax_inputs
# pylint: enable=g-import-not-at-top,wrong-import-position


_VOCAB_SIZE = [None]


def set_vocab_size(vocab_size):
  """Makes every stream check its token ids against the model's vocabulary.

  Args:
    vocab_size: the model's vocab_size, or None to check nothing (the
      default; the trainer sets its model's).
  """
  _VOCAB_SIZE[0] = None if vocab_size is None else int(vocab_size)


def check_token_range(tokens, source):
  """Raises ValueError naming `source` when an id is outside [0, vocab_size).

  Args:
    tokens: an int array (a batch, or a whole file's bytes).
    source: what the tokens come from (a path), for the message.
  """
  vocab = _VOCAB_SIZE[0]
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
  """Yields `batch_fn(i)` for i = 0, 1, ..., resuming at the saved position.

  Args:
    name: the stream's key in `trax.data.inputs.data_counters`, unique per
      stream of a run (e.g. 'enwik8/train/b8/n2048').
    batch_fn: int -> batch (a tuple of numpy arrays), deterministic.
    source: what the data is (a path), for the token-range error; default
      `name`.

  Yields:
    Batches, their inputs checked by `check_token_range`.
  """
  while True:
    i = trax_inputs.data_counters.get(name, 0)
    trax_inputs.data_counters[name] = i + 1
    batch = batch_fn(i)
    check_token_range(batch[0], source or name)
    yield batch


def process_shard():
  """`(index, count)`: this process's place among the training processes.

  Under JAX's distributed runtime (multi-host training) every process reads
  its own slice of each global batch: `batch_size` examples per process,
  `batch_size * count` in all, so no example is read twice in a step and the
  global batches are the same whatever the number of processes sharing them.
  One process reads the whole batch.
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
  """Yields batches of a sequential source, resuming at the saved position.

  For sources without random access (TFDS text): when the position in
  `trax.data.inputs.data_counters[name]` is not where the iterator is (a
  checkpoint was loaded), the source is restarted and that many batches are
  skipped, which yields the same batches as an uninterrupted run when
  `make_iterator` is deterministic.

  Args:
    name: the stream's key in `data_counters`.
    make_iterator: () -> iterator of batches, deterministic.

  Yields:
    Batches.
  """
  it, pos = None, None
  while True:
    i = trax_inputs.data_counters.get(name, 0)
    if it is None or i != pos:
      it, pos = make_iterator(), 0
      for _ in range(i):
        next(it)
      pos = i
    trax_inputs.data_counters[name] = i + 1
    batch = next(it)
    pos += 1
    check_token_range(batch[0], name)
    yield batch


class ResumableInputs(trax_inputs.Inputs):
  """trax `Inputs` whose shape peek does not move the data position.

  trax's `Inputs.__init__` draws one batch to learn the shapes; here the
  positions are put back after it, so that peek is not counted.
  """

  def __init__(self, train_stream, eval_stream):  # pylint: disable=super-init-not-called
    self._train_stream = train_stream
    self._eval_stream = eval_stream
    self._train_eval_stream = train_stream
    saved = dict(trax_inputs.data_counters)
    example = next(train_stream(1))
    trax_inputs.data_counters = saved
    self._input_shape = tuple(example[0].shape)[1:]
    self._input_dtype = example[0].dtype
    self._target_shape = tuple(example[-1].shape)[1:]
    self._target_dtype = example[-1].dtype
    self._example_shape = [x.shape for x in example]
    self._example_dtype = [x.dtype for x in example]
