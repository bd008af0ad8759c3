"""The data position (trax's `inputs.data_counters`), written and read safely.

`data.streams` count the batches they have served in trax's process-wide
`inputs.data_counters`; a checkpoint holds them (`Loop.save_checkpoint`) so a
resumed run continues at the batch it stopped at. These stand in for trax's
`inputs.save_data_counters`/`load_data_counters`: written atomically, read
without a plain unpickler.
"""

import os

from absl import logging
from trax.data import inputs as trax_inputs

from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import pickle_writer
from trax_hourglass.checkpoints.format import safe_unpickle
from trax_hourglass.checkpoints.format import unpickle_from_file
from trax_hourglass.checkpoints.store import data_counters_name
from trax_hourglass.checkpoints.store import is_local
from trax_hourglass.checkpoints.store import write_file_atomically

# trax's own, for output dirs that are not local.
_TRAX_SAVE_DATA_COUNTERS = trax_inputs.save_data_counters


def current():
  """This process's data position (a copy)."""
  return dict(trax_inputs.data_counters)


def restore(counters):
  """Makes `counters` this process's data position."""
  trax_inputs.data_counters = dict(counters)


def save_data_counters(output_dir, host_id=None):
  """`inputs.save_data_counters`, written atomically (temp file, rename)."""
  if not is_local(output_dir):
    return _TRAX_SAVE_DATA_COUNTERS(output_dir, host_id)
  path = os.path.join(output_dir, data_counters_name(host_id))
  if os.path.islink(path):
    os.unlink(path)  # It pointed into a checkpoint: never write through it.
  write_file_atomically(path, pickle_writer(current()))


def load_data_counters(output_dir, host_id=None):
  """`inputs.load_data_counters`, reading the committed data position safely."""
  path = os.path.join(output_dir, data_counters_name(host_id))
  if not is_local(output_dir):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(path):
      return
    counters = unpickle_from_file(path, gzip=False)
  elif not os.path.exists(path):
    logging.info('Did not load data counters as %s does not exist.', path)
    return
  elif os.path.islink(path):
    # Through CURRENT: the Loop's load_checkpoint restores them from the
    # folder it verified (not a damaged newest one it fell back from).
    return
  else:
    counters = safe_unpickle(path, compressed=False)
  if not isinstance(counters, dict):
    raise CheckpointError(f'{path}: data counters must be a dict, found '
                          f'{type(counters).__name__}')
  trax_inputs.data_counters = counters
