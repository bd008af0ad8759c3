"""`Loop`: trax's training Loop that saves crash-safely and loads safely.

A subclass of trax's `training.Loop` (which stays as trax ships it); what it
changes are its own methods:

  save_checkpoint   one atomic commit (`checkpoints.store`) of the weights,
                    slots, history, random key and data position
  load_checkpoint   the committed checkpoint, read without running code, and
                    refused when it is of another model or optimizer config
  run_evals         evals on a key folded off the training key, which stays
  _save_gin         config.gin written atomically
  _run_one_step     the step, then each callback's `after_step(step, loss)`
                    (`progress`: the progress line, a stop on a signal), the
                    loss averaged over every process
  _init_evaluator   eval metrics averaged over every process

The data position is trax's `inputs.data_counters` (`checkpoints.data_position`).
Output dirs that are not local (`gs://...`: no atomic rename, no symlinks)
keep trax's own saving, with a warning, and are read safely.
"""

import collections
import contextlib
import os

from absl import logging
import gin
import jax
from jax.experimental import multihost_utils
from jax import numpy as jnp
import numpy as np
from trax import fastmath
from trax import jaxboard
from trax import layers as tl
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import history as trax_history
from trax.supervised import training

from trax_hourglass import trax_fixes
from trax_hourglass.checkpoints import data_position
from trax_hourglass.checkpoints import format as ckpt_format
from trax_hourglass.checkpoints import reader
from trax_hourglass.checkpoints import store

# Evals draw their keys from the training key folded with this, not split off it.
_EVAL_KEYS = 0x6576616c  # 'eval'
# What to do when a run's checkpoint does not fit its Loop.
_ANOTHER_CONFIG = ('this checkpoint is from a different model or optimizer '
                   'config (use another output_dir, or the same config).')


class Loop(training.Loop):
  """trax's `training.Loop`, crash-safe (see the module docstring).

  Takes trax's arguments; `callbacks` may have `after_step(step, loss)`.
  Installs the fixes trax's training step needs (`trax_fixes`) first.
  """

  def __init__(self, model, tasks, *args, **kwargs):
    trax_fixes.install_training_fixes()  # Before trax builds its Trainer.
    self._mean_over_processes = _all_processes_mean()
    # trax's constructor calls two module functions that must not run as
    # trax wrote them: the data position's reader (a plain unpickler) and,
    # with random_seed=None on several processes, the weight sync (a pmap
    # over a device axis that one device per process lacks). Swapped for
    # the constructor only.
    swaps = [(trax_inputs, 'load_data_counters',
              data_position.load_data_counters)]
    if jax.process_count() > 1:
      swaps.append((training, '_make_weights_and_state_same_across_hosts',
                    _process_0s_weights_and_state))
    with swapped(swaps):
      super().__init__(model, tasks, *args, **kwargs)

  def save_checkpoint(self, basename, keep=2):
    """Commits checkpoint `basename` ('model': the one a run resumes from;
    'model_1000', ...) of this step, keeping `keep` (>= 2) committed ones."""
    output_dir = self._output_dir
    if output_dir is None:
      training._log('Did not save checkpoint as output_dir is None')  # pylint: disable=protected-access
      return
    if not store.is_local(output_dir):
      logging.warning('%s is not a local path: saving with trax\'s own, not '
                      'crash-safe, checkpoints.', output_dir)
      return super().save_checkpoint(basename)
    counters = data_position.current()
    if not self.is_chief:  # Process 0's checkpoint holds the data position.
      training._log('Did not save checkpoint as we are not chief.',  # pylint: disable=protected-access
                    stdout=False)
      return
    pkl_name = basename + '.pkl.gz'
    training._log('Saving checkpoint to %s' % os.path.join(output_dir, pkl_name),  # pylint: disable=protected-access
                  stdout=False)
    files = self._checkpoint_files(basename)
    if basename == 'model':
      # Only the checkpoint a run resumes from owns the top-level counters.
      files[store.data_counters_name()] = ckpt_format.pickle_writer(counters)
    store.commit(output_dir, basename, files, self.step, keep=keep)
    training._log('Checkpoint saved in %s' % os.path.join(output_dir, pkl_name),  # pylint: disable=protected-access
                  stdout=False)

  def _checkpoint_files(self, basename):
    """{file name: writer} of this step's checkpoint, in trax's format."""
    weights = self._model.weights
    if base.N_WEIGHTS_SHARDS > 1:
      weights = self._trainer_per_task[0].accelerated_model_with_loss.weights
      weights = tl.unshard(weights)
    compresslevel = 0 if self._use_memory_efficient_trainer else 2
    files = {}
    for i, trainer in enumerate(self._trainer_per_task):
      flat_slots = self._to_bits(
          training._flatten_and_remove_empty(trainer.slots))  # pylint: disable=protected-access
      files[f'{basename}.opt_slots{i}.npy.gz'] = ckpt_format.arrays_writer(
          flat_slots, compresslevel)
    flat_weights, flat_state = tl.flatten_weights_and_state(
        weights, self._model.state)
    _refuse_non_finite(self._output_dir, basename, self.step, flat_weights)
    _, flat_eval_state = tl.flatten_weights_and_state(weights,
                                                      self._eval_model.state)
    files[f'{basename}.weights.npy.gz'] = ckpt_format.arrays_writer(
        self._to_bits(flat_weights), compresslevel)
    files[f'{basename}.pkl.gz'] = ckpt_format.pickle_writer({
        'step': self.step,
        'flat_weights': compresslevel,  # trax: weights are in .weights.npy.gz
        'flat_state': _to_numpy_tree(self._to_bits(flat_state)),
        'flat_eval_state': _to_numpy_tree(self._to_bits(flat_eval_state)),
        'history': _to_numpy_tree(self._history.to_dict()),
        'slots_per_task': compresslevel,  # trax: in .opt_slotsN.npy.gz
        'input_signature': self._batch_signature[:self._model.n_in],
        'version_timestamp': 'Mar-10-2021',  # trax's format version.
        'rng': _rng_to_numpy(self._rng),  # Extra: trax's loader ignores it.
    }, compresslevel=9)
    return files

  def load_checkpoint(self, directory=None, filename=None):
    """Reads checkpoint `filename` (default 'model', '.pkl.gz' optional) of
    `directory` (default the output dir) safely and strictly, if there is one."""
    directory = directory or self._output_dir
    if directory is None:
      training._log('Not loading as both directory and output_dir are None.',  # pylint: disable=protected-access
                    stdout=False)
      return
    if not store.is_local(directory):
      with swapped([(training, 'unpickle_from_file',
                     ckpt_format.unpickle_from_file)]):
        return super().load_checkpoint(directory, filename)
    directory, basename = reader.checkpoint_location(
        os.path.join(directory, filename or 'model'))
    ckpt = reader.read_checkpoint(directory, basename,
                                  n_tasks=len(self._trainer_per_task))
    if ckpt is None:
      training._log(f'Not loading as there is no checkpoint {basename} in '  # pylint: disable=protected-access
                    f'{directory}', stdout=False)
      return
    pkl_path = os.path.join(ckpt.path, basename + '.pkl.gz')
    training._log('Loading checkpoint from %s' % pkl_path, stdout=False)  # pylint: disable=protected-access
    self._restore_slots(ckpt, basename, pkl_path)
    restored_state = self._restore_weights_and_state(ckpt, basename)
    d = ckpt.data
    self._step = int(d['step'])
    self._history = trax_history.History.from_dict(d['history'])
    if 'rng' in d and self._n_hosts == 1:
      rng = jnp.asarray(d['rng'], dtype=jnp.uint32)
      self._rng = tl.on_cpu(rng) if self._use_memory_efficient_trainer else rng
    if (ckpt.data_counters is not None and self._output_dir is not None and
        os.path.realpath(directory) == os.path.realpath(self._output_dir)):
      data_position.restore(ckpt.data_counters)
    # Send the restored weights and state to the accelerated (replicated)
    # copies the trainers made before loading.
    if all(hasattr(t, 'accelerated_model_with_loss')
           for t in self._trainer_per_task):
      self.update_weights_and_state(
          self._model.weights, self._model.state if restored_state else None)
    training._log('Checkpoint loaded from %s' % pkl_path, stdout=False)  # pylint: disable=protected-access

  def _restore_slots(self, ckpt, basename, pkl_path):
    if len(ckpt.slots_per_task) != len(self._trainer_per_task):
      raise ckpt_format.CheckpointError(
          f'{pkl_path}: has optimizer slots for {len(ckpt.slots_per_task)} '
          f'tasks, this Loop trains {len(self._trainer_per_task)}')
    flatten = training._flatten_and_remove_empty  # pylint: disable=protected-access
    for i, (trainer, slots) in enumerate(zip(self._trainer_per_task,
                                             ckpt.slots_per_task)):
      slots = flatten(slots)
      ckpt_format.check_shapes(
          os.path.join(ckpt.path, f'{basename}.opt_slots{i}.npy.gz'),
          self._to_bits(flatten(trainer.slots)), slots, 'optimizer slot',
          _ANOTHER_CONFIG)
      trainer.slots, _ = fastmath.tree_unflatten(
          self._from_bits(slots), trainer.slots, copy_from_tree=[None, ()])

  def _restore_weights_and_state(self, ckpt, basename):
    """Sets the models' weights (and state); whether the state was restored."""
    d = ckpt.data
    sig = self._model.weights_and_state_signature(d['input_signature'])
    flat_init_weights, flat_init_state = tl.flatten_weights_and_state(
        self._model.weights, self._model.state)
    ckpt_format.check_shapes(
        os.path.join(ckpt.path, f'{basename}.weights.npy.gz'),
        self._to_bits(flat_init_weights), ckpt.flat_weights, 'weight',
        _ANOTHER_CONFIG)
    matched_weights = self._from_bits(list(ckpt.flat_weights))
    try:
      matched_state = self._from_bits(training._match_by_shape(  # pylint: disable=protected-access
          self._to_bits(flat_init_state), d['flat_state']))
      weights, state = tl.unflatten_weights_and_state(matched_weights,
                                                      matched_state, sig)
      self._model.state = state
      restored_state = True
    except IndexError:  # As trax: a changed state layout keeps the fresh state.
      training._log('Failed loading model state from checkpoint, loading '  # pylint: disable=protected-access
                    'weights only.')
      restored_state = False
      weights, _ = tl.unflatten_weights_and_state(matched_weights, (), sig,
                                                  weights_only=True)
    self._model.weights = weights
    self._eval_model.weights = self._model.weights
    if restored_state:
      flat_eval_state = d.get('flat_eval_state', d['flat_state'])
      _, eval_state = tl.unflatten_weights_and_state(
          matched_weights, self._from_bits(list(flat_eval_state)), sig)
      self._eval_model.state = eval_state
    return restored_state

  def run_evals(self, summary_writers=None):
    """trax's evals, leaving the Loop's random key as it found it.

    trax's evals split their keys off the training key, after the Loop saved
    the checkpoint of their step: a run resumed from it drew other dropout
    masks than the run that went on, and a run with evals other masks than
    one without. Here evals draw from a key folded off the training key.
    """
    rng = self._rng
    self._rng = jax.random.fold_in(rng, _EVAL_KEYS)
    try:
      return super().run_evals(summary_writers)
    finally:
      self._rng = rng

  def _save_gin(self, summary_writer):
    """The operative config written atomically to `config.gin` (a link
    planted there is replaced, never written through)."""
    output_dir = self._output_dir
    if not self.is_chief or output_dir is None:
      return
    if not store.is_local(output_dir):
      return super()._save_gin(summary_writer)
    config_str = gin.operative_config_str()
    store.write_file_atomically(os.path.join(output_dir, 'config.gin'),
                                lambda f: f.write(config_str.encode()))
    if summary_writer is not None:
      summary_writer.text(
          'gin_config', jaxboard.markdownify_operative_config_str(config_str))

  def _run_one_step(self, task_index, task_changed):
    """trax's step; then the callbacks' `after_step` with the loss of the
    whole global batch (trax's is of this process's devices only)."""
    loss, stats = super()._run_one_step(task_index, task_changed)
    loss = self._mean_over_processes(loss)  # The Loop logs it too.
    for callback in self._callbacks:
      if hasattr(callback, 'after_step'):
        callback.after_step(self.step, loss)
    return loss, stats

  def _init_evaluator(self, eval_task):
    """trax's evaluator, its metrics averaged over every process (trax's
    are of this process's shard of the eval batch only)."""
    evaluator = super()._init_evaluator(eval_task)
    if jax.process_count() == 1:
      return evaluator
    metrics_fn = evaluator.metrics_fn

    def all_processes_metrics_fn(*args):
      values, state = metrics_fn(*args)
      per_process = multihost_utils.process_allgather(np.asarray(values))
      return np.mean(per_process, axis=0), state

    return evaluator._replace(metrics_fn=all_processes_metrics_fn)


@contextlib.contextmanager
def swapped(swaps):
  """Within it, each `(owner, name, value)` of `swaps` is set; restored after."""
  originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
  try:
    for owner, name, value in swaps:
      setattr(owner, name, value)
    yield
  finally:
    for owner, name, original in reversed(originals):
      setattr(owner, name, original)


def _all_processes_mean():
  """A function: this process's per-device losses -> the mean over all.

  Every process calls it each step (a collective, kept on the devices:
  nothing waits for it until printed).
  """
  if jax.process_count() == 1:
    return lambda loss: loss
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('devices'))
  mean = jax.jit(jnp.mean, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))

  def all_processes_mean(loss):
    # One value per local device (a scalar with one device per process).
    parts = [jnp.reshape(s.data, (1,))
             for s in jnp.asarray(loss).addressable_shards]
    global_loss = jax.make_array_from_single_device_arrays(
        (len(parts) * jax.process_count(),), sharding, parts)
    return mean(global_loss).addressable_data(0)

  return all_processes_mean


def _process_0s_weights_and_state(weights_and_state):
  """Process 0's weights and state, on every process (numpy arrays).

  trax's own averages them with a pmap over what it assumes is a replicated
  copy (a leading device axis), which one device per process lacks ("pmap
  was requested to map its argument along axis 0"); trax meant to broadcast.
  """
  leaves = [np.asarray(x) for x in fastmath.tree_flatten(weights_and_state)]
  leaves = multihost_utils.broadcast_one_to_all(leaves)
  return fastmath.tree_unflatten(leaves, weights_and_state)[0]


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


def _refuse_non_finite(output_dir, basename, step, flat_weights):
  """A diverged run stops here, before its weights replace finite ones."""
  try:
    ckpt_format.check_finite(flat_weights, f'step {step}')
  except ckpt_format.NonFiniteWeightsError as e:
    try:
      last = reader.committed_folder(output_dir, basename)
    except ckpt_format.CheckpointError:
      last = None
    kept = (f'the checkpoint of step {store.step_of(os.path.basename(last))} '
            f'in {output_dir} is kept' if last else 'nothing is saved')
    raise ckpt_format.NonFiniteWeightsError(
        f'training diverged: {e}; not saving them ({kept}). Lower the '
        'learning rate (or check the data) and rerun to resume from the last '
        'checkpoint.') from None
