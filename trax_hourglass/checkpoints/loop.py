"""trax's `training.Loop` saving and loading through `store` and `reader`.

`save_loop_checkpoint`/`load_loop_checkpoint` stand in for the Loop's own
methods (the only code that touches `loop._*`). Besides what trax saves, the
pickle holds the Loop's random key and the commit the data position (trax's
`inputs.data_counters`), so a resumed Loop continues exactly. Loading is
strict: a checkpoint of another model or optimizer config is refused.
"""

import collections
import os

from absl import logging
import gin
import jax
import numpy as np
from trax import fastmath
from trax import jaxboard
from trax import layers as tl
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import history as trax_history
from trax.supervised import training

from trax_hourglass.checkpoints.format import arrays_writer
from trax_hourglass.checkpoints.format import pickle_writer
from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import check_finite
from trax_hourglass.checkpoints.format import check_shapes
from trax_hourglass.checkpoints.format import NonFiniteWeightsError
from trax_hourglass.checkpoints.format import safe_unpickle
from trax_hourglass.checkpoints.format import unpickle_from_file
from trax_hourglass.checkpoints.reader import checkpoint_location
from trax_hourglass.checkpoints.reader import committed_folder
from trax_hourglass.checkpoints.reader import read_checkpoint
from trax_hourglass.checkpoints.store import commit
from trax_hourglass.checkpoints.store import data_counters_name
from trax_hourglass.checkpoints.store import is_local
from trax_hourglass.checkpoints.store import step_of
from trax_hourglass.checkpoints.store import write_file_atomically

# trax's own, for output dirs that are not local.
TRAX_SAVE_CHECKPOINT = training.Loop.save_checkpoint
TRAX_LOAD_CHECKPOINT = training.Loop.load_checkpoint
TRAX_SAVE_DATA_COUNTERS = trax_inputs.save_data_counters
TRAX_RUN_EVALS = training.Loop.run_evals
TRAX_SAVE_GIN = training.Loop._save_gin  # pylint: disable=protected-access
# Evals draw their keys from the training key folded with this, not split off it.
_EVAL_KEYS = 0x6576616c  # 'eval'


def _to_numpy_tree(x):
  """jax arrays -> numpy arrays inside containers, keeping container types."""
  if isinstance(x, jax.Array):
    return np.asarray(x)
  if isinstance(x, collections.defaultdict):
    return collections.defaultdict(
        x.default_factory, {k: _to_numpy_tree(v) for k, v in x.items()})
  if isinstance(x, dict):
    return type(x)((k, _to_numpy_tree(v)) for k, v in x.items())
  if isinstance(x, (list, tuple)) and not hasattr(x, '_fields'):
    return type(x)(_to_numpy_tree(v) for v in x)
  return x


def _rng_to_numpy(rng):
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return np.asarray(rng)


def run_evals_apart(loop, summary_writers=None):
  """`Loop.run_evals`, leaving the Loop's random key as it found it.

  trax's evals split their keys off the training key, after the Loop saved the
  checkpoint of their step: a run resumed from it drew other dropout masks than
  the run that went on, and a run with evals other masks than one without. Here
  evals draw from a key folded off the training key, which stays as it was.
  """
  rng = loop._rng  # pylint: disable=protected-access
  loop._rng = jax.random.fold_in(rng, _EVAL_KEYS)  # pylint: disable=protected-access
  try:
    return TRAX_RUN_EVALS(loop, summary_writers)
  finally:
    loop._rng = rng  # pylint: disable=protected-access


def save_loop_checkpoint(loop, basename, keep=2):
  """`Loop.save_checkpoint`, crash-safe: `basename` 'model' (resumed from) or
  e.g. 'model_1000', of which `keep` (>= 2) committed ones are kept."""
  # pylint: disable=protected-access
  output_dir = loop._output_dir
  if output_dir is None:
    training._log('Did not save checkpoint as output_dir is None')
    return
  if not is_local(output_dir):
    logging.warning('%s is not a local path: saving with trax\'s own, not '
                    'crash-safe, checkpoints.', output_dir)
    return TRAX_SAVE_CHECKPOINT(loop, basename)
  counters = dict(trax_inputs.data_counters)
  if not loop.is_chief:  # Process 0's checkpoint holds the data position.
    training._log('Did not save checkpoint as we are not chief.', stdout=False)
    return
  pkl_name = basename + '.pkl.gz'
  training._log('Saving checkpoint to %s' % os.path.join(output_dir, pkl_name),
                stdout=False)
  weights = loop._model.weights
  if base.N_WEIGHTS_SHARDS > 1:
    weights = loop._trainer_per_task[0].accelerated_model_with_loss.weights
    weights = tl.unshard(weights)
  state = loop._model.state
  compresslevel = 0 if loop._use_memory_efficient_trainer else 2
  files = {}
  for i, trainer in enumerate(loop._trainer_per_task):
    flat_slots = loop._to_bits(training._flatten_and_remove_empty(trainer.slots))
    files[f'{basename}.opt_slots{i}.npy.gz'] = arrays_writer(flat_slots,
                                                             compresslevel)
  input_signature = loop._batch_signature[:loop._model.n_in]
  flat_weights, flat_state = tl.flatten_weights_and_state(weights, state)
  _refuse_non_finite(output_dir, basename, loop.step, flat_weights)
  _, flat_eval_state = tl.flatten_weights_and_state(weights,
                                                    loop._eval_model.state)
  files[f'{basename}.weights.npy.gz'] = arrays_writer(
      loop._to_bits(flat_weights), compresslevel)
  d = {
      'step': loop.step,
      'flat_weights': compresslevel,  # trax: weights are in .weights.npy.gz
      'flat_state': _to_numpy_tree(loop._to_bits(flat_state)),
      'flat_eval_state': _to_numpy_tree(loop._to_bits(flat_eval_state)),
      'history': _to_numpy_tree(loop._history.to_dict()),
      'slots_per_task': compresslevel,  # trax: slots are in .opt_slotsN.npy.gz
      'input_signature': input_signature,
      'version_timestamp': 'Mar-10-2021',  # trax's format version.
      'rng': _rng_to_numpy(loop._rng),  # Extra: trax's loader ignores it.
  }
  files[pkl_name] = pickle_writer(d, compresslevel=9)
  files[data_counters_name()] = pickle_writer(counters)
  if basename != 'model':
    # Only the checkpoint a run resumes from owns the top-level data counters.
    files = {k: v for k, v in files.items()
             if not k.startswith('data_counters')}
  commit(output_dir, basename, files, loop.step, keep=keep)
  training._log('Checkpoint saved in %s' % os.path.join(output_dir, pkl_name),
                stdout=False)
  # pylint: enable=protected-access


def _refuse_non_finite(output_dir, basename, step, flat_weights):
  """A diverged run stops here, before its weights replace finite ones."""
  try:
    check_finite(flat_weights, f'step {step}')
  except NonFiniteWeightsError as e:
    try:
      last = committed_folder(output_dir, basename)
    except CheckpointError:
      last = None
    kept = (f'the checkpoint of step {step_of(os.path.basename(last))} in '
            f'{output_dir} is kept' if last else 'nothing is saved')
    raise NonFiniteWeightsError(
        f'training diverged: {e}; not saving them ({kept}). Lower the '
        'learning rate (or check the data) and rerun to resume from the last '
        'checkpoint.') from None


# What to do when a run's checkpoint does not fit its Loop.
_ANOTHER_CONFIG = ('this checkpoint is from a different model or optimizer '
                   'config (use another output_dir, or the same config).')


def load_loop_checkpoint(loop, directory=None, filename=None):
  """`Loop.load_checkpoint`, reading safely and strictly: `filename` (default
  'model', '.pkl.gz' optional) in `directory` (default the output dir)."""
  # pylint: disable=protected-access
  directory = directory or loop._output_dir
  if directory is None:
    training._log('Not loading as both directory and output_dir are None.',
                  stdout=False)
    return
  if not is_local(directory):
    return TRAX_LOAD_CHECKPOINT(loop, directory, filename)
  directory, basename = checkpoint_location(
      os.path.join(directory, filename or 'model'))
  ckpt = read_checkpoint(directory, basename,
                         n_tasks=len(loop._trainer_per_task))
  if ckpt is None:
    training._log(f'Not loading as there is no checkpoint {basename} in '
                  f'{directory}', stdout=False)
    return
  pkl_path = os.path.join(ckpt.path, basename + '.pkl.gz')
  training._log('Loading checkpoint from %s' % pkl_path, stdout=False)
  if len(ckpt.slots_per_task) != len(loop._trainer_per_task):
    raise CheckpointError(
        f'{pkl_path}: has optimizer slots for {len(ckpt.slots_per_task)} '
        f'tasks, this Loop trains {len(loop._trainer_per_task)}')
  for i, (trainer, slots) in enumerate(zip(loop._trainer_per_task,
                                           ckpt.slots_per_task)):
    model_slots = loop._to_bits(training._flatten_and_remove_empty(
        trainer.slots))
    slots = training._flatten_and_remove_empty(slots)
    check_shapes(os.path.join(ckpt.path, f'{basename}.opt_slots{i}.npy.gz'),
                 model_slots, slots, 'optimizer slot', _ANOTHER_CONFIG)
    trainer.slots, _ = fastmath.tree_unflatten(
        loop._from_bits(slots), trainer.slots, copy_from_tree=[None, ()])
  d = ckpt.data
  input_signature = d['input_signature']
  sig = loop._model.weights_and_state_signature(input_signature)
  flat_init_weights, flat_init_state = tl.flatten_weights_and_state(
      loop._model.weights, loop._model.state)
  check_shapes(os.path.join(ckpt.path, f'{basename}.weights.npy.gz'),
               loop._to_bits(flat_init_weights), ckpt.flat_weights, 'weight',
               _ANOTHER_CONFIG)
  matched_weights = loop._from_bits(list(ckpt.flat_weights))
  try:
    restored_state = True
    matched_state = loop._from_bits(training._match_by_shape(
        loop._to_bits(flat_init_state), d['flat_state']))
    weights, state = tl.unflatten_weights_and_state(matched_weights,
                                                    matched_state, sig)
    loop._model.state = state
  except IndexError:  # As trax: a changed state layout keeps the fresh state.
    training._log('Failed loading model state from checkpoint, loading '
                  'weights only.')
    restored_state = False
    weights, _ = tl.unflatten_weights_and_state(matched_weights, (), sig,
                                                weights_only=True)
  loop._model.weights = weights
  loop._eval_model.weights = loop._model.weights
  if restored_state:
    flat_eval_state = d.get('flat_eval_state', d['flat_state'])
    _, eval_state = tl.unflatten_weights_and_state(
        matched_weights, loop._from_bits(list(flat_eval_state)), sig)
    loop._eval_model.state = eval_state
  loop._step = int(d['step'])
  loop._history = trax_history.History.from_dict(d['history'])
  if 'rng' in d and loop._n_hosts == 1:
    rng = jax.numpy.asarray(d['rng'], dtype=jax.numpy.uint32)
    loop._rng = tl.on_cpu(rng) if loop._use_memory_efficient_trainer else rng
  if (ckpt.data_counters is not None and loop._output_dir is not None and
      os.path.realpath(directory) == os.path.realpath(loop._output_dir)):
    trax_inputs.data_counters = dict(ckpt.data_counters)
  # Send the restored weights and state to the accelerated (replicated) copies
  # the trainers made before loading.
  if all(hasattr(t, 'accelerated_model_with_loss')
         for t in loop._trainer_per_task):
    loop.update_weights_and_state(loop._model.weights,
                                  loop._model.state if restored_state else None)
  training._log('Checkpoint loaded from %s' % pkl_path, stdout=False)
  # pylint: enable=protected-access


def save_gin(loop, summary_writer):
  """`Loop._save_gin`: the operative config written atomically to
  `config.gin` (a link planted there is replaced, never written through)."""
  # pylint: disable=protected-access
  output_dir = loop._output_dir
  if not loop.is_chief or output_dir is None:
    return
  if not is_local(output_dir):
    return TRAX_SAVE_GIN(loop, summary_writer)
  config_str = gin.operative_config_str()
  write_file_atomically(os.path.join(output_dir, 'config.gin'),
                        lambda f: f.write(config_str.encode()))
  if summary_writer is not None:
    summary_writer.text(
        'gin_config', jaxboard.markdownify_operative_config_str(config_str))
  # pylint: enable=protected-access


def save_data_counters(output_dir, host_id=None):
  """`inputs.save_data_counters`, written atomically (temp file, rename)."""
  if not is_local(output_dir):
    return TRAX_SAVE_DATA_COUNTERS(output_dir, host_id)
  path = os.path.join(output_dir, data_counters_name(host_id))
  if os.path.islink(path):
    os.unlink(path)  # It pointed into a checkpoint: never write through it.
  write_file_atomically(path, pickle_writer(dict(trax_inputs.data_counters)))


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
