"""Finding and reading a run's checkpoint safely, whatever state it is in.

`read_checkpoint` follows `CURRENT` to the committed folder (`store`), or
falls back to the newest folder that verifies, with a warning, when the
pointer is missing, dangling, not a link or names a damaged folder; when none
verifies it refuses rather than let a run restart from step 0 over them.
Plain trax checkpoints (no folders) are read too. Nothing is unpickled with
a plain unpickler (`format.safe_unpickle`).
"""

import dataclasses
import itertools
import os
import typing

from absl import logging

from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import read_arrays
from trax_hourglass.checkpoints.format import safe_unpickle
from trax_hourglass.checkpoints.manifest import check_file as _check_file
from trax_hourglass.checkpoints.manifest import manifest_time as _manifest_time
from trax_hourglass.checkpoints.manifest import verify_manifest as _verify_manifest
from trax_hourglass.checkpoints.store import checkpoint_root as _checkpoint_root
from trax_hourglass.checkpoints.store import CHECKPOINTS_DIR
from trax_hourglass.checkpoints.store import CURRENT
from trax_hourglass.checkpoints.store import data_counters_name
from trax_hourglass.checkpoints.store import step_of


@dataclasses.dataclass
class Checkpoint:
  """What one checkpoint holds, read safely.

  Attributes:
    step: the training step it was saved at.
    data: the pickled dict (trax's keys: flat_state, flat_eval_state, history,
      input_signature, ...; plus 'rng' when written here).
    flat_weights: list of numpy arrays (bfloat16 ones as uint16 bits).
    slots_per_task: list (per training task) of lists of numpy arrays.
    data_counters: dict of data positions, or None.
    path: the committed folder, or the directory of a plain trax checkpoint.
    manifest: the MANIFEST.json dict, or None for a plain trax checkpoint.
  """
  step: int
  data: dict
  flat_weights: list
  slots_per_task: list
  data_counters: typing.Optional[dict]
  path: str
  manifest: typing.Optional[dict]


def committed_folder(directory, basename='model'):
  """The committed folder of `basename` in `directory` (`_locate`), or None."""
  return _locate(directory, basename, verify=False)[0]


_WARNED = set()


def _warn_once(message):
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning('%s', message)


def _locate(directory, basename, verify):
  """(committed folder or None, its verified manifest or None).

  Follows `CURRENT`; when it is missing, dangling, not a link, or (with
  `verify`) names a folder that fails its manifest, falls back to the newest
  folder that verifies, and warns naming both. Refuses (CheckpointError) when
  there are folders but none verifies.
  """
  root = _checkpoint_root(directory, basename)
  if not os.path.isdir(root):
    return None, None
  pointer = os.path.join(root, CURRENT)
  damaged = None
  target = os.readlink(pointer) if os.path.islink(pointer) else None
  if target is not None and (step_of(target) is None or os.sep in target):
    problem = (f'{pointer} points to {target!r}, not to a checkpoint folder '
               'beside it')
  elif target is not None:
    folder = os.path.join(root, target)
    if os.path.isdir(folder) and not os.path.islink(folder):
      if not verify:
        return folder, None
      try:
        return folder, _verify_manifest(folder)
      except CheckpointError as e:
        damaged = folder
        problem = f'the newest checkpoint {folder} is damaged: {e}'
    else:
      problem = f'{pointer} points to {folder}, which is missing'
  elif os.path.isdir(pointer):
    problem = (f'{pointer} is a folder, not a link to one (copied with links '
               'followed, e.g. cp -rL)')
  elif os.path.lexists(pointer):
    problem = f'{pointer} is a plain file, not a link to a checkpoint folder'
  else:
    problem = f'{pointer} is missing'
  names = [e for e in os.listdir(root) if step_of(e) is not None and
           os.path.isdir(os.path.join(root, e)) and
           not os.path.islink(os.path.join(root, e))]
  candidates = sorted(
      (os.path.join(root, e) for e in names),
      key=lambda f: (step_of(os.path.basename(f)), _manifest_time(f)),
      reverse=True)
  if os.path.isdir(pointer) and not os.path.islink(pointer):
    candidates.append(pointer)  # The copy itself, if nothing else is left.
  candidates = [f for f in candidates if f != damaged]
  if not candidates and damaged is None and not os.path.lexists(pointer):
    return None, None  # Nothing was ever committed here.
  first_error = None
  for folder in candidates:
    try:
      manifest = _verify_manifest(folder)
    except CheckpointError as e:
      first_error = first_error or e
      continue
    _warn_once(f'{problem}; using the newest intact checkpoint, {folder} '
               f'(step {manifest.get("step")}). The next save repairs the '
               'pointer.')
    return folder, manifest
  raise CheckpointError(
      f'{problem}, and none of the {len(candidates)} other checkpoint folders '
      f'in {root} is intact' + (f' (newest: {first_error})' if first_error
                                else '') +
      '. Not training from step 0 over them: restore the directory from a '
      f'copy, or move {root} away to start afresh.')


def _top_level_is_ours(directory, basename, manifest):
  """Whether `directory/basename.pkl.gz` is the committed checkpoint's.

  A link through CURRENT, nothing, or a plain copy of the committed file
  (a copy that followed links) are; a file trax wrote itself is not.
  """
  link = os.path.join(directory, basename + '.pkl.gz')
  if not os.path.lexists(link):
    return True
  if os.path.islink(link):
    return os.readlink(link).startswith(
        os.path.join(CHECKPOINTS_DIR, basename, CURRENT))
  record = (manifest or {}).get('files', {}).get(basename + '.pkl.gz')
  if record is None:
    return False
  try:
    _check_file(link, record)
  except CheckpointError:
    return False
  return True


def read_checkpoint(directory, basename='model', n_tasks=None):
  """Reads checkpoint `basename` of `directory` safely: a `Checkpoint` or None.

  Reads the committed folder when there is one (verifying its manifest), else
  plain trax files `directory/basename.*`; `n_tasks` optimizer slot files
  (None: all there are).
  """
  folder, manifest = _locate(directory, basename, verify=True)
  if folder is not None and _top_level_is_ours(directory, basename, manifest):
    path = folder
  else:
    manifest = None
    if folder is not None:
      logging.warning('%s: plain trax files (written by trax after this '
                      'checkpoint) are used instead of %s.',
                      os.path.join(directory, basename + '.pkl.gz'), folder)
    path = directory
    if not os.path.exists(os.path.join(path, basename + '.pkl.gz')):
      return None
  prefix = os.path.join(path, basename)
  data = safe_unpickle(prefix + '.pkl.gz')
  if not isinstance(data, dict) or not {'step', 'flat_weights'} <= set(data):
    raise CheckpointError(f'{prefix}.pkl.gz: not a trax checkpoint (no step '
                          'or flat_weights)')
  if isinstance(data.get('flat_weights'), int):
    flat_weights = read_arrays(prefix + '.weights.npy.gz')
  else:  # trax's older format: weights inside the pickle.
    flat_weights = list(data['flat_weights'])
  if 'slots' in data:  # trax's oldest format: one task's slots in the pickle.
    slots_per_task = [data['slots']]
  elif isinstance(data.get('slots_per_task'), int):
    slots = f'{prefix}.opt_slots{{}}.npy.gz'
    if n_tasks is None:  # As many as there are.
      n_tasks = next(i for i in itertools.count()
                     if not os.path.exists(slots.format(i)))
    slots_per_task = [read_arrays(slots.format(i)) for i in range(n_tasks)]
  else:
    slots_per_task = list(data.get('slots_per_task') or [])
  # Every process resumes at process 0's data position: this project's
  # streams count global batches, the same on every process (only process 0
  # commits checkpoints).
  counters_path = os.path.join(path, data_counters_name(0))
  data_counters = None
  if manifest is not None and os.path.exists(counters_path):
    data_counters = safe_unpickle(counters_path, compressed=False)
  return Checkpoint(step=int(data['step']), data=data,
                    flat_weights=flat_weights, slots_per_task=slots_per_task,
                    data_counters=data_counters, path=path, manifest=manifest)


def checkpoint_location(path):
  """(directory, checkpoint name) that `path` means: the one place that says.

  An output dir means its `model` checkpoint (the one a run resumes from); a
  file `dir/name.pkl.gz` (top-level, inside a committed folder, or written by
  trax, e.g. a released checkpoint) means checkpoint `name` in `dir`. The
  suffix may be left off (trax's `Loop.load_checkpoint` names 'model').
  """
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    return path, 'model'
  directory, name = os.path.split(path)
  return directory, name.removesuffix('.pkl.gz')


def read_checkpoint_at(path, n_tasks=0):
  """`read_checkpoint` of what `path` means (`checkpoint_location`), or
  FileNotFoundError."""
  directory, basename = checkpoint_location(path)
  ckpt = read_checkpoint(directory, basename, n_tasks=n_tasks)
  if ckpt is None:
    raise FileNotFoundError(f'no checkpoint {basename}.pkl.gz in {directory}; '
                            'has the run saved one yet?')
  return ckpt
