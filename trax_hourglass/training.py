"""`train`: a gin-configured training run, from config to committed checkpoint.

The `trainer` command calls it after parsing its flags into gin; a notebook
can call it after parsing a config (`gin.parse_config_file(...)`):

    loop = trax_hourglass.train('/tmp/run')

It reads top to bottom: install the fixes trax's training step needs
(`trax_fixes`, for trax 1.4.1 only), refuse a config that would train
wrongly, settle the model's loss and precision, take the output dir (one trainer at a time, the
same settings as the run it resumes), then let trax's `trainer_lib.train`
build inputs, model, loss, optimizer and tasks from gin's `train.*` bindings
(the names users write, recorded in the run's `config.gin`) and train them
with `trax_hourglass.Loop`, which saves, loads, evaluates and reports
(`loop`). trax's Loop and training functions are left as they ship (only
its training step gets `trax_fixes`): `trainer_lib.train` builds the Loop that
`training.Loop` names, and loads `train.init_checkpoint` with
`Layer.init_from_file`, so while it runs those two name ours.
"""

import datetime
import inspect
import math
import os

import gin
import jax
from trax import fastmath
from trax.layers import base
from trax.supervised import trainer_lib
from trax.supervised import training as trax_training

from trax_hourglass import checkpoints
from trax_hourglass import progress
from trax_hourglass import runs
from trax_hourglass import trax_fixes
from trax_hourglass.data import streams
from trax_hourglass.layers import boundaries
from trax_hourglass.loop import Loop
from trax_hourglass.loop import swapped


def train(output_dir=None, dtype=None):
  """Trains gin's `train.model` on `train.inputs` (trax's bindings).

  Args:
    output_dir: where checkpoints, `config.gin` and summaries go; a run
      resumes from the checkpoint there. Default: ~/trax/<model>_<time>.
    dtype: None, or 'float32'/'bfloat16': binds `train.model`'s dtype
      (the compute precision; weights stay float32).

  Returns:
    The `Loop`, trained to `train.steps` and its last step committed.

  Raises:
    progress.TrainingStopped: SIGTERM/SIGINT stopped it after a step whose
      checkpoint is committed.
    trax_fixes.UntestedTraxError: the installed trax is not trax 1.4.1.
  """
  trax_fixes.install_training_fixes()
  _check_config()
  _bind_boundary_loss()
  _bind_dtype(dtype)
  output_dir = _output_dir_or_default(output_dir)
  _print_devices(trainer_lib.num_devices() or fastmath.local_device_count())
  if not jax.process_index():  # Other hosts of a run share its output dir.
    checkpoints.lock_output_dir(output_dir)
  # Every process refuses alike (the same command, the same output dir).
  runs.check_run_settings(
      output_dir, runs.run_settings(),
      resuming=checkpoints.committed_folder(output_dir) is not None,
      write=not jax.process_index())
  _add_callback(progress.ProgressReporter)
  _add_callback(progress.SaveOnSignal)  # After the progress line of its step.
  # SIGTERM/SIGINT from here until the last checkpoint is committed: finish
  # the step, save, stop.
  with progress.saving_on_signals():
    try:
      with swapped([(trax_training, 'Loop', Loop),
                    (base.Layer, 'init_from_file',
                     checkpoints.init_from_file)]):
        loop = trainer_lib.train(output_dir=output_dir)
    finally:
      streams.set_vocab_size(None)  # Only this run's streams check it.
    ckpt = checkpoints.committed_folder(output_dir)
    if loop.step and (ckpt is None or not os.path.basename(ckpt).startswith(
        f'step_{loop.step:09d}.')):
      loop.save_checkpoint('model')  # trax saves only on its schedule.
    if progress.stop_requested():  # It came after the last step.
      raise progress.TrainingStopped(progress.stop_requested(), loop.step,
                                     output_dir)
  _print_end(loop, output_dir)
  return loop


def _check_config():
  """Refuses what would train wrongly or unsafely, before any compiling."""
  try:
    use_loop = gin.query_parameter('train.use_loop')
  except ValueError:
    use_loop = True
  try:
    eval_frequency = gin.query_parameter('train.eval_frequency')
  except ValueError:
    eval_frequency = 1  # Bound by default: trainer_lib.train's 100.
  if (isinstance(eval_frequency, bool) or not isinstance(eval_frequency, int)
      or eval_frequency < 1):
    # trax's Loop saves and evaluates every eval_frequency steps (its old
    # Trainer read 0 as "never"; the Loop divides by it).
    raise ValueError(
        f'train.eval_frequency={eval_frequency!r}: the Loop evaluates and '
        'saves a checkpoint every eval_frequency steps; use a positive '
        'integer (e.g. train.steps, to evaluate and save at the end only)')
  if not use_loop:
    raise ValueError(
        "train.use_loop=False runs trax's old Trainer, whose checkpoints are "
        'neither crash-safe nor read safely; remove the binding to train with '
        'the Loop (the default).')
  try:  # Data ids must fit the model's embedding (which would clamp them).
    model = gin.query_parameter('train.model')
    vocab_size = gin.query_parameter(f'{model.selector}.vocab_size')
  except (ValueError, AttributeError):
    vocab_size = None
  streams.set_vocab_size(vocab_size if isinstance(vocab_size, int) else None)


def _bind_boundary_loss():
  """Learned boundaries: the model returns (logits, boundary_loss); unless the
  config says otherwise, train on their sum and report the term separately."""
  try:
    model = gin.query_parameter('train.model')
    kind = gin.query_parameter(f'{model.selector}.boundaries')
  except (ValueError, AttributeError):
    return
  if kind not in boundaries.LEARNED:
    return
  for name, value in (('train.loss_fn', '@trax_hourglass.LossWithBoundaries()'),
                      ('train.metrics', '@trax_hourglass.boundary_metrics()')):
    try:
      gin.query_parameter(name)
    except ValueError:  # Not bound.
      with gin.unlock_config():
        gin.parse_config(f'{name} = {value}')


def _bind_dtype(dtype):
  """`dtype`: binds train.model's dtype, or refuses a model without one."""
  if dtype is None:
    return
  try:
    model = gin.query_parameter('train.model')
  except ValueError:
    model = None
  fn = getattr(getattr(model, 'configurable', None), 'wrapped', None)
  if fn is None or 'dtype' not in inspect.signature(fn).parameters:
    name = getattr(getattr(model, 'configurable', None), 'name', model)
    raise ValueError(f'--dtype {dtype}: train.model {name} takes no dtype; '
                     'use it with trax_hourglass.HourglassLM.')
  with gin.unlock_config():
    gin.bind_parameter(f'{model.selector}.dtype', dtype)


def _output_dir_or_default(output_dir):
  if output_dir:
    return os.path.expanduser(output_dir)
  try:
    model_name = gin.query_parameter('train.model').configurable.name
  except (ValueError, AttributeError):
    model_name = 'model'
  name = f'{model_name}_{datetime.datetime.now().strftime("%Y%m%d_%H%M")}'
  output_dir = os.path.expanduser(os.path.join('~', 'trax', name))
  print(f'No --output_dir given: using {output_dir}', flush=True)
  return output_dir


def _print_devices(n_devices):
  devices = jax.devices()
  kinds = sorted({f'{d.platform}:{d.device_kind}' for d in devices})
  where = (f'{n_devices} per process x {jax.process_count()} processes'
           if jax.process_count() > 1 else f'{n_devices}')
  print(f'Devices: {len(devices)} x {", ".join(kinds)}; training on '
        f'{where} (data parallel).', flush=True)


def _add_callback(callback_class):
  """Adds `callback_class` to gin's `train.callbacks` (keeping bound ones)."""
  try:
    bound = list(gin.query_parameter('train.callbacks') or [])
  except ValueError:
    bound = []
  with gin.unlock_config():
    gin.bind_parameter('train.callbacks', bound + [callback_class])


def _print_end(loop, output_dir):
  print(f'Finished training at step {loop.step}; checkpoints in {output_dir}',
        flush=True)
  evals = loop.history.get('eval', 'metrics/loss')
  if evals:  # The last eval comes after the last progress line.
    step, value = evals[-1]
    try:
      unit = gin.query_parameter('ProgressReporter.unit')
    except ValueError:
      unit = 'token'
    print(f'Eval at step {step}: {float(value) / math.log(2):.3f} '
          f'bits/{unit} on held-out data.', flush=True)
