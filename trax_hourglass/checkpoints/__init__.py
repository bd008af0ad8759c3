"""Crash-safe checkpoints for trax's `training.Loop`, in trax's own file format.

  format    trax's files, read without executing code (and written)
  manifest  a committed folder's MANIFEST.json, every file checked
  store     a checkpoint as one unit: durable files, an atomic commit
  reader    found again and read after any crash
  lock      one trainer per output dir
  loop      the Loop's save/load (and data counters) through them, its
            evals kept off the training key
  weights   the loaders of a model's weights

`install()` (the `trainer` calls it) patches `_PATCHES` into trax, so every
Loop, including `trainer_lib.train`'s, saves and loads this way. Output dirs
that are not local (`gs://...`: no atomic rename, no symlinks) keep trax's
own saving, with a warning, and are read safely. `install_readers()` (called
wherever a run is read: eval, sample, `load_predict_model`) replaces only
trax's pickle readers, so that nothing a run's config reaches unpickles
with trax's plain unpickler.
"""

# pylint: disable=g-importing-member,unused-import
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import training

from trax_hourglass.checkpoints import format  # pylint: disable=redefined-builtin
from trax_hourglass.checkpoints import loop
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
    (trax_inputs, 'load_data_counters', loop.load_data_counters),
    (base.Layer, 'init_from_file', weights.init_from_file),
    (training, 'unpickle_from_file', format.unpickle_from_file),
)
# What `install` replaces in trax, and trax's originals (for `uninstall`).
_PATCHES = (
    (training.Loop, 'save_checkpoint', loop.save_loop_checkpoint),
    (training.Loop, 'load_checkpoint', loop.load_loop_checkpoint),
    (training.Loop, 'run_evals', loop.run_evals_apart),
    (training.Loop, '_save_gin', loop.save_gin),
    (trax_inputs, 'save_data_counters', loop.save_data_counters),
) + _READERS
_TRAX_ORIGINALS = [getattr(owner, name) for owner, name, _ in _PATCHES]


def install():
  """Makes every trax Loop save and load crash-safely (idempotent): `_PATCHES`."""
  for owner, name, ours in _PATCHES:
    setattr(owner, name, ours)


def install_readers():
  """Makes trax's pickle readers safe (idempotent): `_READERS`."""
  for owner, name, ours in _READERS:
    setattr(owner, name, ours)


def uninstall():
  """Restores trax's own checkpointing (for tests comparing with it)."""
  for (owner, name, _), original in zip(_PATCHES, _TRAX_ORIGINALS):
    setattr(owner, name, original)
