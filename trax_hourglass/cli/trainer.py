"""`trainer`: trains a gin-configured model with trax's `trainer_lib.train`.

    trainer --config_file=gin/quickstart.gin --output_dir=~/runs/quick
    trainer --config_file=gin/enwik8_hourglass.gin --data_dir=~/data \
        --config='train.steps=1000' --output_dir=~/runs/enwik8

Flags are trax's trainer's (`--config_file`, `--config` bindings applied after
the files, `--output_dir`, `--data_dir`, `--dataset`, `--model`); gin files use
trax's bindings plus this project's configurables. Rerunning the same command
after a crash or `kill -9` resumes at the last checkpoint (crash-safe, see
`trax_hourglass.checkpoints`) with the same weights, slots and data position.
Multi-host: one process per host, with `--coordinator_address`,
`--num_processes`, `--process_id` (or their $JAX_* variables, or none in a
SLURM job or TPU pod slice); batch sizes are then per process, and process 0
prints and writes the checkpoints. Progress is one line (the last field: the
compute precision, `--dtype`):
  step 1200/5000 | loss 1.0412 | 1.502 bits/byte | 8.1k tok/s | 0.25 s/step | left 0:15:50 | float32
"""

import argparse
import contextlib
import datetime
import inspect
import math
import os
import re
import sys
import traceback

import gin
import numpy as np

from trax_hourglass import cli
from trax_hourglass.cli import run_command
# pylint: disable=g-importing-member,unused-import
from trax_hourglass.cli.distributed import _detected_cluster
from trax_hourglass.cli.distributed import distributed_settings
from trax_hourglass.cli.distributed import init_distributed
from trax_hourglass.cli.distributed import lost_a_process
# pylint: enable=g-importing-member,unused-import


def _parse_args(argv):
  parser = cli.ArgumentParser(
      prog='trainer', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config_file', action='append', default=[],
                      help='gin config file (repeatable)')
  parser.add_argument('--config', action='append', default=[],
                      help="gin binding, e.g. 'train.steps=100' (repeatable)")
  parser.add_argument('--output_dir', default=None,
                      help='where checkpoints and summaries go; a run resumes '
                           'from the checkpoint there')
  parser.add_argument('--data_dir', default=None,
                      help='directory with the data (enwik8, TFDS data)')
  parser.add_argument('--dataset', default=None,
                      help="trax's data_streams.dataset_name")
  parser.add_argument('--model', default=None,
                      help='a model in trax.models, e.g. TransformerLM')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help="compute precision: binds train.model's dtype, "
                           'e.g. HourglassLM.dtype (weights stay float32)')
  multihost = parser.add_argument_group(
      'multi-host training (one process per host; none of these on one host)')
  multihost.add_argument(
      '--coordinator_address', default=None,
      help='host:port of process 0, reachable from every process '
           '(default $JAX_COORDINATOR_ADDRESS)')
  multihost.add_argument('--num_processes', default=None,
                         help='number of processes (default $JAX_NUM_PROCESSES)')
  multihost.add_argument('--process_id', default=None,
                         help="this process's index, 0..num_processes-1 "
                              '(default $JAX_PROCESS_ID)')
  multihost.add_argument(
      '--coordinator_timeout', default='300',
      help='seconds to wait for all the processes to join the coordinator '
           'before giving up with an error (default 300, as jax)')
  multihost.add_argument(
      '--heartbeat_timeout', default='100',
      help='seconds without a heartbeat after which the processes give up on '
           'a lost one and exit (default 100, as jax)')
  return parser.parse_args(argv)


def _print_devices(n_devices):
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({f'{d.platform}:{d.device_kind}' for d in devices})
  where = (f'{n_devices} per process x {jax.process_count()} processes'
           if jax.process_count() > 1 else f'{n_devices}')
  print(f'Devices: {len(devices)} x {", ".join(kinds)}; training on '
        f'{where} (data parallel).', flush=True)


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


def _add_callback(callback_class):
  """Adds `callback_class` to gin's `train.callbacks` (keeping bound ones)."""
  try:
    bound = list(gin.query_parameter('train.callbacks') or [])
  except ValueError:
    bound = []
  with gin.unlock_config():
    gin.bind_parameter('train.callbacks', bound + [callback_class])


def _check_config():
  """Refuses what would train wrongly or unsafely, before any compiling."""
  from trax_hourglass.data import streams  # pylint: disable=g-import-not-at-top
  cli.check_gin_value_types()
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
  from trax_hourglass.layers import boundaries  # pylint: disable=g-import-not-at-top
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
  """--dtype: binds train.model's dtype, or refuses a model without one."""
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


def run(args):
  """Parses gin, trains; returns the trax Loop."""
  n_processes = init_distributed(args)
  if n_processes == 1:
    return _train(args)
  import jax  # pylint: disable=g-import-not-at-top
  from trax_hourglass import compat  # pylint: disable=g-import-not-at-top
  if (jax.default_backend() == 'cpu' and jax.local_device_count() > 1 and
      compat.multiprocess_cpu_training_hangs()):
    # Refuse rather than hang (every process stops here, alike).
    raise ValueError(
        f'{jax.local_device_count()} CPU devices per process hang '
        f'multi-process training with jax {jax.__version__} (its CPU runtime '
        'deadlocks in cross-process collectives); use one CPU device per '
        'process, one process, GPUs/TPUs, or jax 0.4.38 (pip install -e . '
        '-c constraints/oldest.txt)')
  try:
    if not jax.process_index():
      return _train(args)
    # Process 0 prints for all (errors still show).
    print(f'Process {jax.process_index()} of {n_processes}: training with '
          f'{jax.local_device_count()} local device(s); process 0 prints '
          'the progress and writes the checkpoints.', flush=True)
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
      return _train(args)
  except Exception as e:  # pylint: disable=broad-except
    if not lost_a_process(e):
      raise
    if cli.wants_traceback(args):
      traceback.print_exc()
    first_line = (str(e).strip().splitlines() or [''])[0].rstrip('.') + '.'
    print(f'trainer: error: process {jax.process_index()} of {n_processes} '
          'lost contact with another training process (it stopped or its '
          f'host is unreachable): {first_line} Relaunch all the processes to '
          'resume from the last checkpoint.', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exiting normally would wait on jax's shutdown barrier for the lost
    # process, and then abort.
    os._exit(1)  # pylint: disable=protected-access


def _train(args):
  """`run` after the distributed runtime is up."""
  from trax_hourglass import checkpoints  # pylint: disable=g-import-not-at-top
  from trax_hourglass import data  # pylint: disable=g-import-not-at-top
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  from trax.supervised import trainer_lib  # pylint: disable=g-import-not-at-top

  checkpoints.install()
  bindings = [(f'--config={b!r}', b) for b in args.config]
  # Flag values reach gin as literals (repr), never as gin text.
  if args.dataset:
    bindings.append(('--dataset',
                     f'data_streams.dataset_name={args.dataset!r}'))
  if args.data_dir:
    data.set_default_data_dir(os.path.expanduser(args.data_dir))
    bindings.append(('--data_dir', f'data_streams.data_dir={args.data_dir!r}'))
  if args.model:
    if not re.fullmatch(r'[A-Za-z_]\w*', args.model):
      raise ValueError(f'--model={args.model!r} is not a model name; pass '
                       'one of trax.models, e.g. TransformerLM')
    bindings.append(('--model', f'train.model=@trax.models.{args.model}'))
  cli.check_gin_files(args.config_file)
  cli.parse_gin(args.config_file, bindings)
  _check_config()
  _bind_boundary_loss()
  _bind_dtype(args.dtype)
  output_dir = _output_dir_or_default(args.output_dir)
  n_devices = trainer_lib.num_devices() or fastmath.local_device_count()
  _print_devices(n_devices)
  if not jax.process_index():  # Other hosts of a run share its output dir.
    checkpoints.lock_output_dir(output_dir)
  # Every process refuses alike (the same command, the same output dir).
  runs.check_run_settings(
      output_dir, runs.run_settings(),
      resuming=checkpoints.committed_folder(output_dir) is not None,
      write=not jax.process_index())
  _add_callback(runs.ProgressReporter)
  _add_callback(runs.SaveOnSignal)  # After the progress line of its step.
  # SIGTERM/SIGINT from here until the last checkpoint is committed: finish
  # the step, save, stop (exit 128 + the signal).
  try:
    with runs.saving_on_signals():
      try:
        loop = trainer_lib.train(output_dir=output_dir)
      finally:
        data.streams.set_vocab_size(None)  # Only this run's streams check it.
      ckpt = checkpoints.committed_folder(output_dir)
      if loop.step and (ckpt is None or not os.path.basename(ckpt).startswith(
          f'step_{loop.step:09d}.')):
        loop.save_checkpoint('model')  # trax saves only on its schedule.
      if runs.stop_requested():  # It came after the last step.
        raise runs.TrainingStopped(runs.stop_requested(), loop.step,
                                   output_dir)
  except runs.TrainingStopped as stopped:
    print(f'trainer: {stopped.message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    raise SystemExit(stopped.exit_code) from None
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
  settings = runs.final_sample()
  if settings['length'] > 0 and not jax.process_index():  # Printed by 0.
    _print_sample(loop, settings)
  return loop


def _print_sample(loop, settings):
  """Samples from the trained weights in predict mode (`decoding.sample`)."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  prompt = np.frombuffer(settings['prompt'].encode('utf-8'), np.uint8)
  model = decoding.load_predict_model(
      loop.model.weights,
      model_fn=gin.query_parameter('train.model').scoped_configurable_fn,
      max_len=len(prompt) + settings['length'])
  out = decoding.sample(model, settings['length'],
                        prompt=prompt if len(prompt) else None,
                        temperature=settings['temperature'],
                        seed=settings['seed'])[0]
  text = (prompt.tobytes() + bytes(np.clip(out, 0, 255).astype(np.uint8))
          ).decode('utf-8', errors='replace')
  kind = 'greedy' if settings['temperature'] <= 0 else (
      f'temperature {settings["temperature"]}')
  print(f'Sample ({kind}, {settings["length"]} bytes after the prompt):\n'
        f'{text}', flush=True)


def main(argv=None):
  """Console entry point: `trainer --config_file=... --output_dir=...`."""
  return run_command('trainer', _parse_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
