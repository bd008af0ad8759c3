"""Crash-safe checkpoints for trax's `training.Loop`, in trax's own file format.

  format         trax's files, read without executing code (and written)
  manifest       a committed folder's MANIFEST.json, every file checked
  store          a checkpoint as one unit: durable files, an atomic commit
  reader         found again and read after any crash
  lock           one trainer per output dir
  data_position  the data position (trax's data counters), written atomically
  weights        the loaders of a model's weights

`trax_hourglass.Loop` (a subclass of trax's) saves and loads through them.
Nothing here changes trax: `safe_trax_readers()` makes trax's own pickle
readers safe within a `with` block, for code that calls them directly.
"""

import contextlib

# pylint: disable=g-importing-member,unused-import
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import training

from trax_hourglass.checkpoints import format  # pylint: disable=redefined-builtin
from trax_hourglass.checkpoints import data_position
from trax_hourglass.checkpoints import store
from trax_hourglass.checkpoints import weights
from trax_hourglass.checkpoints.format import check_finite
from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import from_bits
from trax_hourglass.checkpoints.format import NonFiniteWeightsError
from trax_hourglass.checkpoints.format import read_arrays
from trax_hourglass.checkpoints.format import safe_unpickle
from trax_hourglass.checkpoints.lock import lock_output_dir
from trax_hourglass.checkpoints.lock import OutputDirInUseError
from trax_hourglass.checkpoints.manifest import MANIFEST
from trax_hourglass.checkpoints.reader import checkpoint_location
from trax_hourglass.checkpoints.reader import Checkpoint
from trax_hourglass.checkpoints.reader import committed_folder
from trax_hourglass.checkpoints.reader import read_checkpoint
from trax_hourglass.checkpoints.reader import read_checkpoint_at
from trax_hourglass.checkpoints.store import CHECKPOINTS_DIR
from trax_hourglass.checkpoints.store import commit
from trax_hourglass.checkpoints.store import CURRENT
from trax_hourglass.checkpoints.weights import init_from_file
from trax_hourglass.checkpoints.weights import load_trax_hourglass_weights
# pylint: enable=g-importing-member,unused-import

# trax's readers of pickles, and ours that stand in for them.
_READERS = (
    (trax_inputs, 'load_data_counters', data_position.load_data_counters),
    (base.Layer, 'init_from_file', weights.init_from_file),
    (training, 'unpickle_from_file', format.unpickle_from_file),
)


@contextlib.contextmanager
def safe_trax_readers():
  """Within it, trax's own pickle readers (`_READERS`) read safely; restored
  after."""
  originals = [getattr(owner, name) for owner, name, _ in _READERS]
  try:
    for owner, name, ours in _READERS:
      setattr(owner, name, ours)
    yield
  finally:
    for (owner, name, _), original in zip(_READERS, originals):
      setattr(owner, name, original)
