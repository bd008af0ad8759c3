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
import errno
import inspect
import io
import math
import os
import re
import socket
import sys
import threading
import traceback

import gin
import numpy as np

from trax_hourglass import cli
from trax_hourglass.cli import supervise
from trax_hourglass.cli import run_command


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


_DISTRIBUTED_ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
                    'num_processes': 'JAX_NUM_PROCESSES',
                    'process_id': 'JAX_PROCESS_ID'}


def _int_setting(value, name, least):
  try:
    x = int(value)
  except (TypeError, ValueError):
    x = None
  if x is None or x < least:
    raise ValueError(f'{name}={value!r} must be an integer >= {least}')
  return x


def distributed_settings(args, environ=None):
  """Checked `(coordinator_address, num_processes, process_id)` from the flags,
  else the JAX_* variables of `environ` (default os.environ); None if neither."""
  environ = os.environ if environ is None else environ
  found = {}
  for name, env in _DISTRIBUTED_ENV.items():
    value, source = getattr(args, name), f'--{name}'
    if value is None and environ.get(env):
      value, source = environ[env], f'${env}'
    found[name] = (value, source)
  address, address_source = found['coordinator_address']
  if address is not None:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f'{address_source}={address!r} must be host:port with '
                       'a port 1..65535, e.g. 10.0.0.1:8476 (process 0\'s '
                       'host)')
  n, n_source = found['num_processes']
  if n is not None:
    n = _int_setting(n, n_source, 1)
  i, i_source = found['process_id']
  if i is not None:
    i = _int_setting(i, i_source, 0)
    if n is not None and i >= n:
      raise ValueError(f'{i_source}={i} must be below {n_source}={n} '
                       f'(0..{n - 1})')
  return address, n, i


def _detected_cluster():
  """The jax cluster environment (SLURM, TPU pod, ...) this runs in, or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env
    except Exception:  # pylint: disable=broad-except
      continue  # e.g. a Kubernetes pod without the kubernetes package.
  return None


def init_distributed(args, environ=None):
  """Starts JAX's distributed runtime when this is one of several processes.

  From the flags or JAX_* environment variables, else by jax's own detection
  of a multi-process cluster (SLURM, TPU pod slice, Open MPI); otherwise (one
  process) does nothing. Must run before any jax computation.

  Returns:
    The number of processes.
  """
  settings = distributed_settings(args, environ)
  timeout = _int_setting(args.heartbeat_timeout, '--heartbeat_timeout', 2)
  join_timeout = _int_setting(getattr(args, 'coordinator_timeout', 300),
                              '--coordinator_timeout', 1)
  if settings[1] == 1:
    return 1  # Said to be alone.
  if None in settings and _detected_cluster() is None:
    if settings == (None, None, None):
      return 1  # The default: one process.
    missing = [f'--{name} (${env})' for (name, env), value in zip(
        _DISTRIBUTED_ENV.items(), settings) if value is None]
    raise ValueError(
        'multi-host training needs --coordinator_address, --num_processes '
        'and --process_id (no cluster detected to supply them); missing '
        f'{", ".join(missing)}')
  import jax  # pylint: disable=g-import-not-at-top
  # Collectives between CPU processes (none by default in jax 0.4.x); the
  # accelerators bring their own.
  if jax.config.values.get('jax_cpu_collectives_implementation') == 'none':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # Bound how long a process waits for a lost one: jax 0.4.x has heartbeat
  # settings only on its internal initialize (the public one checks that jax
  # was not used yet, so check that here too).
  interval = max(1, min(10, timeout // 5))
  heartbeats = dict(service_heartbeat_interval_seconds=interval,
                    service_max_missing_heartbeats=timeout // interval,
                    client_heartbeat_interval_seconds=interval,
                    client_max_missing_heartbeats=timeout // interval)
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    init = distributed.global_state.initialize
    internal = (set(heartbeats) <= set(inspect.signature(init).parameters)
                and not xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    internal = False
  if not internal:
    init = jax.distributed.initialize
    # Newer jax: one heartbeat timeout, in the public initialize.
    accepted = inspect.signature(init).parameters
    heartbeats = ({'heartbeat_timeout_seconds': timeout}
                  if 'heartbeat_timeout_seconds' in accepted else {})
  if 'initialization_timeout' in inspect.signature(init).parameters:
    # jax aborts (a C++ stack dump) when it gives up: the watchdog below
    # says it first, in one line.
    heartbeats['initialization_timeout'] = join_timeout + 60
  if settings[0] is not None and settings[2] == 0:
    _check_coordinator_port_free(settings[0])
  with _joining(settings, join_timeout):
    init(*settings, **heartbeats)
  return jax.process_count()


def lost_contact_line(i, n, detail):
  """The one line a process prints when another one of the run is gone."""
  first_line = (str(detail).strip().splitlines() or [''])[0].rstrip('.') + '.'
  return (f'trainer: error: process {i} of {n} lost contact with another '
          'training process (it stopped or its host is unreachable): '
          f'{first_line} Relaunch all the processes to resume from the last '
          'checkpoint.')


def _check_coordinator_port_free(address):
  """Process 0 serves the coordinator on its port: refuse one in use (jax
  aborts), e.g. by a second process given --process_id 0."""
  port = int(address.rpartition(':')[2])
  with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET,
                     socket.SOCK_STREAM) as s:
    try:
      s.bind(('', port))  # All interfaces, as jax's service binds.
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return  # Not ours to judge (no IPv6 here, ...): jax will say.
      raise ValueError(
          f'--process_id=0 serves the coordinator at {address}, but port '
          f'{port} is in use on this host: by another process 0 of this '
          'run (give each process its own --process_id 0..num_processes-1) '
          'or another program (pick a free port).') from None


@contextlib.contextmanager
def _joining(settings, timeout):
  """Says what this process waits for; ends it with one line after `timeout`.

  jax's initialize blocks (without the GIL) until every process has joined
  the coordinator, and after its own timeout aborts the process with a C++
  stack dump; an unreachable coordinator or a process id given twice are
  both only that wait.
  """
  address, n, i = settings
  where = address or 'the address the cluster gives'
  if i == 0:
    print(f'Process 0 of {n}: coordinating at {where}; waiting up to '
          f'{timeout} s for the other {n - 1} process(es) to join '
          '(--coordinator_timeout).', flush=True)
    problem = (f'the other processes did not all join the coordinator at '
               f'{where} within {timeout} s')
  else:
    who = f'Process {i} of {n}' if i is not None else 'This process'
    print(f'{who}: joining the coordinator at {where} (process 0); waiting '
          f'up to {timeout} s for all {n or "the"} processes '
          '(--coordinator_timeout).', flush=True)
    problem = (f'{who.lower()} could not join the coordinator at {where} '
               f'with all the other processes within {timeout} s')

  def give_up():
    print(f'trainer: error: {problem}: start every process with the same '
          '--coordinator_address (process 0\'s host:port, reachable from '
          'every host) and --num_processes, each with its own --process_id '
          '0..num_processes-1 (a second process given an id takes the '
          'first one\'s place), or raise --coordinator_timeout.',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    yield
  finally:
    watchdog.cancel()


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
    if not _lost_a_process(e):
      raise
    if cli.wants_traceback(args):
      traceback.print_exc()
    print(lost_contact_line(jax.process_index(), n_processes, e),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exiting normally would wait on jax's shutdown barrier for the lost
    # process, and then abort.
    os._exit(1)  # pylint: disable=protected-access


def _lost_a_process(error):
  """Whether `error` is a collective or the runtime failing on a lost peer."""
  text = str(error)
  # jax raises XlaRuntimeError, JaxRuntimeError or (0.10: a gloo collective)
  # ValueError: the text says.
  return type(error).__name__ in ('XlaRuntimeError', 'JaxRuntimeError',
                                  'ValueError', 'RuntimeError') and any(
      s in text for s in ('Gloo', 'gloo', 'Connection reset', 'heartbeat',
                          'coordination service', 'NCCL', 'DEADLINE_EXCEEDED'))


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
  argv = sys.argv[1:] if argv is None else list(argv)
  who = _one_of_several(argv)
  if who:  # jax aborts on a lost process: a parent reports it in one line.
    return supervise.run(argv, who if None not in who else None,
                         lost_contact_line, debug='--debug' in argv)
  return run_command('trainer', _parse_args, run, argv)


def _one_of_several(argv):
  """(process index, count) when this process should be supervised, else
  None: a multi-process run, not yet under its parent (`cli.supervise`)."""
  if os.environ.get(supervise.CHILD_ENV):
    return None
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      args = _parse_args(argv)
    _, n, i = distributed_settings(args)
    if n is None and i is None and _detected_cluster() is not None:
      return (None, None)
  except (Exception, SystemExit):  # pylint: disable=broad-except
    return None  # The unsupervised run says what is wrong, in one line.
  return (i, n) if n is not None and n > 1 else None


if __name__ == '__main__':
  sys.exit(main())
