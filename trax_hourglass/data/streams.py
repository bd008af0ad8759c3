"""Resumable batch streams: the data position is part of every checkpoint.

A stream here is a pure function of its position: batch i is `batch_fn(i)`. The
position lives in trax's `trax.data.inputs.data_counters[name]`, which the Loop
saves with each checkpoint (atomically, see `trax_hourglass.checkpoints`) and
restores when it resumes, so a resumed run reads exactly the batches the
uninterrupted run would have read. The counter is looked up on every batch
(not captured), because the Loop replaces that dict when it loads a checkpoint
after the streams were made.
"""

import numpy as np

from trax_hourglass import compat

compat.apply()

# pylint: disable=g-import-not-at-top,wrong-import-position
from trax.data import inputs as trax_inputs
# pylint: enable=g-import-not-at-top,wrong-import-position


def resumable_stream(name, batch_fn):
  """Yields `batch_fn(i)` for i = 0, 1, ..., resuming at the saved position.

  Args:
    name: the stream's key in `trax.data.inputs.data_counters`, unique per
      stream of a run (e.g. 'enwik8/train/b8/n2048').
    batch_fn: int -> batch (a tuple of numpy arrays), deterministic.

  Yields:
    Batches.
  """
  while True:
    i = trax_inputs.data_counters.get(name, 0)
    trax_inputs.data_counters[name] = i + 1
    yield batch_fn(i)


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
