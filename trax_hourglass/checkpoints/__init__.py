"""Crash-safe checkpoints for trax's `training.Loop`, in trax's own file format.

  format  trax's files, read without executing code (and written)
  store   a checkpoint as one unit: durable files, an atomic commit, found
          again after any crash; one trainer per output dir
  loop    the Loop's save/load (and data counters) through it, and the
          loaders of a model's weights (`init_from_file`,
          `load_trax_hourglass_weights`)

Use: call `install()` once (the `trainer` script does). It patches, in this one
place, `trax.supervised.training.Loop.save_checkpoint`/`load_checkpoint`,
`trax.data.inputs.save_data_counters`/`load_data_counters`,
`trax.layers.base.Layer.init_from_file` and `training.unpickle_from_file`
(which trax's old `Trainer` loads with), so every Loop, including the one built
by `trax.supervised.trainer_lib.train`, saves and loads this way. Output dirs
that are not local paths (e.g. `gs://...`, which has no atomic rename or
symlinks) keep trax's own saving, with a warning, and are read safely.
"""

# pylint: disable=g-importing-member,unused-import
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import training

from trax_hourglass.checkpoints import format  # pylint: disable=redefined-builtin
from trax_hourglass.checkpoints import loop
from trax_hourglass.checkpoints import store
from trax_hourglass.checkpoints.format import check_finite
from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import from_bits
from trax_hourglass.checkpoints.format import NonFiniteWeightsError
from trax_hourglass.checkpoints.format import read_arrays
from trax_hourglass.checkpoints.format import safe_unpickle
from trax_hourglass.checkpoints.format import SafeUnpickler
from trax_hourglass.checkpoints.format import unpickle_from_file
from trax_hourglass.checkpoints.loop import init_from_file
from trax_hourglass.checkpoints.loop import load_data_counters
from trax_hourglass.checkpoints.loop import load_loop_checkpoint
from trax_hourglass.checkpoints.loop import load_trax_hourglass_weights
from trax_hourglass.checkpoints.loop import save_data_counters
from trax_hourglass.checkpoints.loop import save_loop_checkpoint
from trax_hourglass.checkpoints.store import CHECKPOINTS_DIR
from trax_hourglass.checkpoints.store import Checkpoint
from trax_hourglass.checkpoints.store import checkpoint_location
from trax_hourglass.checkpoints.store import commit
from trax_hourglass.checkpoints.store import committed_folder
from trax_hourglass.checkpoints.store import CURRENT
from trax_hourglass.checkpoints.store import is_local
from trax_hourglass.checkpoints.store import lock_output_dir
from trax_hourglass.checkpoints.store import MANIFEST
from trax_hourglass.checkpoints.store import OutputDirInUseError
from trax_hourglass.checkpoints.store import read_checkpoint
from trax_hourglass.checkpoints.store import read_checkpoint_at
# pylint: enable=g-importing-member,unused-import

# ---------------------------------------------------------------------------
# Installing into trax.
# ---------------------------------------------------------------------------

# What `install` replaces in trax, and trax's originals (for `uninstall`).
_PATCHES = (
    (training.Loop, 'save_checkpoint', save_loop_checkpoint),
    (training.Loop, 'load_checkpoint', load_loop_checkpoint),
    (trax_inputs, 'save_data_counters', save_data_counters),
    (trax_inputs, 'load_data_counters', load_data_counters),
    (base.Layer, 'init_from_file', init_from_file),
    (training, 'unpickle_from_file', unpickle_from_file),
)
_TRAX_ORIGINALS = [getattr(owner, name) for owner, name, _ in _PATCHES]


def install():
  """Makes every trax Loop save and load crash-safely (idempotent).

  Patches `training.Loop.save_checkpoint` and `load_checkpoint`,
  `trax.data.inputs.save_data_counters`/`load_data_counters` (which the Loop
  calls by module attribute), `Layer.init_from_file` and
  `training.unpickle_from_file` (trax's old Trainer reads with it).
  """
  for owner, name, ours in _PATCHES:
    setattr(owner, name, ours)


def uninstall():
  """Restores trax's own checkpointing (for tests comparing with it)."""
  for (owner, name, _), original in zip(_PATCHES, _TRAX_ORIGINALS):
    setattr(owner, name, original)
