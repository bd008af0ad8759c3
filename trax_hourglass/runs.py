"""Run-directory helpers: what a training run prints, where its files are.

`ProgressReporter` is the trainer's compact progress line (a trax training
callback), `final_sample` what it samples at the end; both are gin
configurables under `trax_hourglass`, registered on `import trax_hourglass`, so
a run's gin files parse anywhere (a notebook, trax's own trainer).
`SaveOnSignal` (with `saving_on_signals`) makes SIGTERM and SIGINT end a run
after its current step with a committed checkpoint. `parse_run_config` reads a
run's gin config back and returns its model; `parse_config_safely` reads gin
configs as data (`_PARTS`, `_SETTINGS`).
"""

import contextlib
import datetime
import json
import math
import os
import signal
import threading
import time
import tokenize

from absl import logging
import gin
from gin import config as gin_config
from gin import config_parser
import jax
from jax import numpy as jnp
import numpy as np
from trax import fastmath
from trax.supervised import callbacks

from trax_hourglass import checkpoints
from trax_hourglass import files as hg_files
from trax_hourglass.layers import precision


def _format_duration(secs):
  if secs is None or not math.isfinite(secs):
    return '?'
  return str(datetime.timedelta(seconds=int(max(0, secs))))


def _format_rate(x):
  for unit, scale in (('M', 1e6), ('k', 1e3)):
    if x >= scale:
      return f'{x / scale:.1f}{unit}'
  return f'{x:.0f}'


def _n_params(model):
  return int(sum(np.prod(w.shape) for w in fastmath.tree_flatten(model.weights)
                 if hasattr(w, 'shape')))


def _all_processes_mean():
  """A function: this process's per-device losses -> the mean over all.

  The Loop averages the loss over this process's devices only; the progress
  line reports the whole global batch's. Every process calls it each step (a
  collective, kept on the devices: nothing waits for it until printed).
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


@gin.configurable(module='trax_hourglass')
class ProgressReporter(callbacks.TrainingStepCallback):
  """Prints a compact progress line during training.

  Args (gin):
    every_secs: print at most this often (and at the first and last step).
    unit: what a token is, for 'bits per <unit>': 'byte' (byte-level text),
      'dim' (image subpixels) or 'token'.
    total_steps: the run's length; default `train.steps` from gin.
  """

  def __init__(self, loop, every_secs=30.0, unit='token', total_steps=None):
    super().__init__(loop)
    self._every_secs = every_secs
    self._unit = unit
    if total_steps is None:
      try:
        total_steps = gin.query_parameter('train.steps')
      except ValueError:
        total_steps = 1000  # trainer_lib.train's default.
    self._total = total_steps
    batch = loop.tasks[0].sample_batch
    n_processes = jax.process_count()
    self._tokens_per_step = int(np.prod(batch[0].shape)) * n_processes
    batch_size = batch[0].shape[0]
    if batch_size % loop.n_devices:
      raise ValueError(
          f'batch size {batch_size} cannot be split evenly over '
          f'{loop.n_devices} devices; use a multiple of {loop.n_devices} '
          '(or set num_devices.value).')
    self._losses = []
    self._last_time = None
    self._last_step = loop.step
    evals = self._evals()  # A resumed run's: printed by the run that made them.
    self._last_eval_step = evals[-1][0] if evals else None
    self._start_step = loop.step
    self._first = None  # (time, step) when the first step (compile) ended.
    self._precision = precision.activation_dtype(loop.model)
    # Keep each step's loss (a device array, read only when printing) and
    # report after the step: callbacks run before the Loop sees the loss.
    run_one_step = loop._run_one_step  # pylint: disable=protected-access
    all_processes_mean = _all_processes_mean()
    def run_one_step_and_report(*args, **kwargs):
      if self._last_time is None:
        self._last_time = time.time()
      loss, stats = run_one_step(*args, **kwargs)
      loss = all_processes_mean(loss)  # The Loop logs it too.
      self._losses.append(loss)
      self._maybe_print(loop.step)
      return loss, stats
    loop._run_one_step = run_one_step_and_report  # pylint: disable=protected-access
    shape = tuple(batch[0].shape)
    if n_processes > 1:
      shape = f'{n_processes} x {shape} (one per process)'
    print(f'Model: {_n_params(loop.model):,} parameters; batch '
          f'{shape} = {self._tokens_per_step:,} tokens per step over '
          f'{loop.n_devices * n_processes} device(s).', flush=True)
    if loop.step:
      print(f'Resumed from the checkpoint at step {loop.step} in '
            f'{loop.output_dir}.', flush=True)

  def _evals(self):
    # trainer_lib names the eval cross-entropy 'loss'; a Loop may use the
    # layer's name.
    return (self._loop.history.get('eval', 'metrics/loss') or
            self._loop.history.get('eval',
                                   'metrics/WeightedCategoryCrossEntropy'))

  def call_at(self, step):
    return False  # All work happens in run_one_step_and_report.

  def _maybe_print(self, step):
    now = time.time()
    if (now - self._last_time >= self._every_secs or
        step == self._start_step + 1 or step >= self._total):
      self._print(step, now)

  def _print(self, step, now):
    losses = [float(np.mean(np.asarray(l))) for l in self._losses]
    bad = [i for i, l in enumerate(losses) if not math.isfinite(l)]
    if bad:  # Read here, not per step: no device sync per step.
      raise ValueError(
          f'training diverged: the loss is {losses[bad[0]]} at step '
          f'{step - len(losses) + bad[0] + 1}; stopping (the last finite '
          'checkpoint is kept). Lower the learning rate (or check the '
          'data) and rerun to resume from it.')
    loss = float(np.mean(losses))
    n_steps = max(1, step - self._last_step)
    secs = max(1e-9, now - self._last_time)
    per_step = secs / n_steps
    if self._first is None:
      self._first = (now, step)
      left = (self._total - step) * per_step
    else:  # The mean since the first (compiling) step, evals included.
      left = ((self._total - step) * (now - self._first[0]) /
              max(1, step - self._first[1]))
    parts = [f'step {step}/{self._total}', f'loss {loss:.4f}',
             f'{loss / math.log(2):.3f} bits/{self._unit}',
             f'{_format_rate(self._tokens_per_step / per_step)} tok/s',
             f'{per_step:.2f} s/step', f'left {_format_duration(left)}',
             self._precision]  # The compute dtype.
    evals = self._evals()
    if evals and evals[-1][0] != self._last_eval_step:
      self._last_eval_step, value = evals[-1]
      parts.append(f'eval {float(value) / math.log(2):.3f} bits/{self._unit} '
                   f'@{self._last_eval_step}')
      boundary = self._loop.history.get('eval', 'metrics/boundary_loss')
      if boundary:  # Learned boundaries: the training loss includes it.
        parts.append(f'boundary loss {float(boundary[-1][1]):.4f}')
    print(' | '.join(parts), flush=True)
    self._losses = []
    self._last_time = now
    self._last_step = step


# What SLURM, Kubernetes and `timeout` send (SIGTERM), and Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested = {'signal': 0}  # The first stop signal received (0: none).


def _on_stop_signal(signum, frame):  # pylint: disable=unused-argument
  # Only recorded: a signal never interrupts a step or a save (a second one
  # during the save changes nothing); the step loop reads it between steps.
  _requested['signal'] = _requested['signal'] or signum


def stop_requested():
  """The stop signal this process received (0: none) under `saving_on_signals`."""
  return _requested['signal']


@contextlib.contextmanager
def saving_on_signals():
  """Within it, SIGTERM/SIGINT ask `SaveOnSignal` to save and stop.

  The previous handlers come back on leaving, unless a stop was requested:
  then this process is on its way out and the signals are ignored (Python
  would restore their default, killing, action while it exits).
  """
  if threading.current_thread() is not threading.main_thread():
    yield  # Python delivers signals to the main thread only.
    return
  _requested['signal'] = 0
  previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, signal.SIG_IGN if _requested['signal'] else handler)


class TrainingStopped(Exception):
  """Training stopped on a signal after committing a checkpoint.

  Attributes:
    exit_code: 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a
      shell reports a process the signal ended.
  """

  def __init__(self, signum, step, output_dir):
    self.exit_code = 128 + signum
    # Kept apart: gin appends its configurable to the exception's text.
    self.message = (f'stopped by {signal.Signals(signum).name}: saved the '
                    f'checkpoint of step {step} in {output_dir}; rerun the '
                    'same command to resume from it.')
    super().__init__(self.message)


def _agreed_stop():
  """A function: this process's stop signal (0: none) -> the one to act on.

  One process: its own. Several: every step sends each process's signal into
  a max over all processes (a collective, in the same order on all of them)
  and acts on the previous step's result, read one step late so that nothing
  waits for it. Every process thus stops after the same step, even when only
  one of them was signalled.
  """
  if jax.process_count() == 1:
    return lambda signum: signum
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('devices',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('devices'))
  largest = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  pending = []

  def agreed_stop(signum):
    parts = [jax.device_put(np.array([signum], np.int32), d)
             for d in jax.local_devices()]
    pending.append(largest(jax.make_array_from_single_device_arrays(
        (len(parts) * jax.process_count(),), sharding, parts)))
    if len(pending) < 2:
      return 0
    return int(np.asarray(pending.pop(0).addressable_data(0)))

  return agreed_stop


@gin.configurable(module='trax_hourglass')
class SaveOnSignal(callbacks.TrainingStepCallback):
  """After a step, on SIGTERM/SIGINT (`saving_on_signals`): save and stop.

  The step in progress when the signal comes finishes; the Loop's `model`
  checkpoint of it is committed (`checkpoints.store`: atomic, so no later
  signal can leave it half-written) and `TrainingStopped` ends training.
  """

  def __init__(self, loop):
    super().__init__(loop)
    run_one_step = loop._run_one_step  # pylint: disable=protected-access
    agreed_stop = _agreed_stop()

    def run_one_step_or_stop(*args, **kwargs):
      result = run_one_step(*args, **kwargs)
      signum = agreed_stop(stop_requested())
      if signum:
        loop.save_checkpoint('model')
        raise TrainingStopped(signum, loop.step, loop.output_dir)
      return result

    loop._run_one_step = run_one_step_or_stop  # pylint: disable=protected-access

  def call_at(self, step):
    return False  # All work happens in run_one_step_or_stop.


@gin.configurable(module='trax_hourglass')
def final_sample(length=0, prompt='', temperature=0.0, seed=0):
  """What the trainer samples after training (length 0: nothing).

  Args:
    length: how many tokens to generate.
    prompt: text whose UTF-8 bytes start the sample (byte-level models).
    temperature: 0 for greedy decoding, else softmax temperature.
    seed: sampling seed.

  Returns:
    The settings as a dict.
  """
  return dict(length=length, prompt=prompt, temperature=temperature, seed=seed)


RUN_SETTINGS = 'run.json'  # What a run was started with, beside config.gin.


def _as_data(value):
  """`value` as JSON data, stable across processes (no addresses)."""
  if isinstance(value, gin.config.ConfigurableReference):
    return '@' + value.selector + ('()' if value.evaluate else '')
  if isinstance(value, dict):
    return {str(k): _as_data(v) for k, v in sorted(value.items(), key=str)}
  if isinstance(value, (list, tuple)):
    return [_as_data(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, '__qualname__'):  # A function or class.
    return f'{getattr(value, "__module__", "")}.{value.__qualname__}'
  text = repr(value)
  return type(value).__qualname__ if ' at 0x' in text else text


def run_settings():
  """What a resumed run must share with its start, from gin: the model and
  the data (their configurables' bindings, which hold the batch size) and the
  number of processes (batch sizes are per process)."""
  settings = {'processes': jax.process_count()}
  for name in ('train.model', 'train.inputs'):
    try:
      ref = gin.query_parameter(name)
    except ValueError:
      continue
    if isinstance(ref, gin.config.ConfigurableReference):
      settings[name] = {'configurable': ref.selector,
                        'bindings': _as_data(gin.get_bindings(ref.selector))}
  for selector in ('data_streams', 'batcher'):  # trax's own data.
    try:
      bindings = gin.get_bindings(selector)
    except ValueError:
      continue
    if bindings:
      settings[selector] = _as_data(bindings)
  return settings


def _differences(recorded, current, prefix=''):
  """['name: recorded -> current', ...] of two `run_settings`."""
  found = []
  for key in sorted(set(recorded) | set(current)):
    a, b = recorded.get(key, '(unset)'), current.get(key, '(unset)')
    name = f'{prefix}{key}'
    if isinstance(a, dict) and isinstance(b, dict):
      found += _differences(a, b, name + '.' if name else '')
    elif a != b:
      found.append(f'{name}: {a!r} -> {b!r}')
  return found


def check_run_settings(output_dir, settings, resuming, write=True):
  """Refuses to resume a run with other settings than it was started with.

  `settings` (`run_settings`) are recorded in `output_dir/run.json` (JSON,
  written atomically) when a run starts; when `resuming` (a checkpoint is
  there) they are compared with the recorded ones and any difference raises
  ValueError naming the first: the checkpoint's weights, optimizer and data
  position would go on with another model, data file or batch size.
  """
  if not checkpoints.store.is_local(output_dir):
    return  # No atomic writes there.
  path = os.path.join(output_dir, RUN_SETTINGS)
  recorded = None
  if resuming and os.path.isfile(path) and not os.path.islink(path):
    try:
      with open(path, 'rb') as f:
        recorded = json.loads(f.read(1 << 20).decode())
    except (OSError, ValueError) as e:
      logging.warning('%s: unreadable (%s); recording this run\'s settings.',
                      path, e)
  current = json.loads(json.dumps(settings))  # As read back.
  if isinstance(recorded, dict):
    diffs = _differences(recorded, current)
    if diffs:
      raise ValueError(
          f'{output_dir} was started with other settings than these '
          f'({"; ".join(diffs[:3])}{"; ..." if len(diffs) > 3 else ""}): '
          'resuming would go on with its weights and data position under '
          f'them. Use the settings recorded in {path}, or another '
          f'--output_dir, or remove {path} to resume with these on purpose.')
    return
  if write:
    checkpoints.store.write_file_atomically(
        path, lambda f: f.write(json.dumps(current, indent=1).encode()))


def parse_run_config(config_files, bindings=()):
  """Parses a run's gin config(s); returns its train.model function.

  Clears gin's config first, so that bindings of an earlier model do not leak
  into this one. Configurables of other programs are skipped.
  """
  for path in config_files:
    if not os.path.exists(path):
      raise FileNotFoundError(f'gin config {path} does not exist.')
  gin.clear_config()
  # Not finalized (locked): building a model may still import modules that
  # register configurables, which a locked config refuses.
  parse_config_safely(config_files, bindings)
  try:
    model = gin.query_parameter('train.model')
  except ValueError:
    model = None
  if model is None:
    raise ValueError(f'gin config {", ".join(config_files)} binds no '
                     'train.model; pass a training config, or model_fn.')
  return model.scoped_configurable_fn


def run_config(path):
  """The gin config of the run that `path` (output dir, checkpoint) is of.

  trax's trainer writes the run's operative config as `config.gin` into the
  output dir, beside the top-level checkpoint.
  """
  return os.path.join(checkpoints.checkpoint_location(path)[0], 'config.gin')


def run_configs(config_files, path):
  """`config_files`, else the `run_config` of `path`, which must exist."""
  if config_files:
    return list(config_files)
  default = run_config(path)
  if not os.path.exists(default):
    raise FileNotFoundError(
        f'there is no {default} (the trainer writes it after its first '
        'step); pass the model\'s gin config with --config_file.')
  return [default]


# A run's gin config is data: it may name the configurables of a model and
# its data, which building and scoring it call, by module ...
_PARTS = ('trax_hourglass', 'trax.layers', 'trax.models', 'trax.optimizers',
          'trax.supervised.lr_schedules', 'trax.data')
# ... and bind the parameters of the training it records (trax writes every
# configurable a run called into its config.gin); no value may refer to these.
_SETTINGS = ('trax.supervised.trainer_lib.train',
             'trax.supervised.trainer_lib.num_devices',
             'trax.supervised.training.TrainTask',
             'trax.supervised.training.EvalTask',
             'trax.fastmath.ops.backend',
             'trax.data.debug_data_pipeline.debug_pipeline')
# The modules it may import (they register the configurables above).
_IMPORTS = ('trax_hourglass', 'trax')
_MAX_CONFIG_BYTES = 1 << 24
_MAX_INCLUDE_DEPTH = 8


class UnsafeConfigError(ValueError):
  """A gin config names something a run's config must not (it could run code)."""


def _refuse(path, location, what):
  line = location.line_num if location is not None else '?'
  raise UnsafeConfigError(
      f'{path}:{line}: {what}, refused: a run\'s gin config is data, it may '
      'bind only the configurables of a model, its data and training '
      f'({", ".join(_PARTS)}; trax\'s train settings) and import only '
      'trax_hourglass. Nothing was run; remove the line, or pass the model\'s '
      'gin config (e.g. from gin/) with --config_file.')


def _in(module, prefixes):
  return module is not None and any(
      module == p or module.startswith(p + '.') for p in prefixes)


def _configurable(selector, path, location):
  """The registered configurable `selector` (partial) names, or None."""
  try:
    return gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  except (ValueError, KeyError) as e:  # Ambiguous.
    _refuse(path, location, f'{selector} is ambiguous ({e})')


class _CheckingDelegate(gin_config.ParserDelegate):
  """gin's parser delegate, refusing a reference (`@name`, `@name()`) to
  anything but a part of a model or its data (`_PARTS`)."""

  def __init__(self, path):
    super().__init__(skip_unknown=True)
    self._path = path
    self.parser = None  # Set once the parser is made.

  def configurable_reference(self, scoped_selector, evaluate):
    location = self.parser._current_location()  # pylint: disable=protected-access
    selector = scoped_selector.rsplit('/', 1)[-1]
    found = _configurable(selector, self._path, location)
    if found is None or not _in(found.module, _PARTS):
      what = (found.selector if found is not None else
              f'{selector} (no such configurable)')
      _refuse(self._path, location, f'refers to @{what}')
    return super().configurable_reference(scoped_selector, evaluate)


def _read_config_text(path):
  try:
    data = hg_files.read_bounded(path, _MAX_CONFIG_BYTES)
  except hg_files.NotRegularFileError as e:
    raise ValueError(f'gin config {e}; pass a gin file.') from None
  if len(data) > _MAX_CONFIG_BYTES:
    raise ValueError(f'gin config {path} has over {_MAX_CONFIG_BYTES:,} '
                     'bytes; it is not a gin config.')
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'gin config {path} is not UTF-8 text ({e})') from None


def _included_path(path, filename):
  """Where an `include` of `filename` in config `path` points: beside `path`,
  else from the folder above (the repository's variants name their base as
  'gin/enwik8_hourglass.gin', which gin finds from the repository's root)."""
  here = os.path.dirname(os.path.realpath(path))
  for folder in (here, os.path.dirname(here)):
    candidate = os.path.realpath(os.path.join(folder, filename))
    if os.path.exists(candidate):
      return candidate
  return os.path.realpath(os.path.join(here, filename))


def _checked_parts(path, root, depth=0):
  """[(text, path)] of gin config `path` in order, each text free of
  `include`s (the files they name, inside `root`, checked and in their place)
  and checked: only `_PARTS` and `_SETTINGS`, only `_IMPORTS`."""
  text = _read_config_text(path)
  lines = [line + '\n' for line in text.split('\n')]  # As gin counts them.
  delegate = _CheckingDelegate(path)
  try:
    parser = config_parser.ConfigParser(text, delegate)
    delegate.parser = parser
    statements = list(parser)
  except UnsafeConfigError as e:  # Without the lines gin adds.
    raise UnsafeConfigError(str(e).splitlines()[0]) from None
  except SyntaxError as e:
    raise ValueError(f'{path}:{e.lineno}: gin syntax error: {e.msg} '
                     f'({(e.text or "").strip()!r})') from None
  except tokenize.TokenError as e:
    raise ValueError(f'{path}:{e.args[1][0]}: gin syntax error: '
                     f'{e.args[0]} (an unclosed bracket?)') from None
  parts, start = [], 0
  for statement in statements:
    location = statement.location
    if isinstance(statement, config_parser.ImportStatement):
      if statement.is_from or not _in(statement.module, _IMPORTS):
        _refuse(path, location, repr(statement.format()))
    elif isinstance(statement, config_parser.IncludeStatement):
      if depth >= _MAX_INCLUDE_DEPTH:
        _refuse(path, location, 'includes files more than '
                f'{_MAX_INCLUDE_DEPTH} deep (a cycle?)')
      real = _included_path(path, statement.filename)
      if os.path.commonpath([real, root]) != root:
        _refuse(path, location, f'includes {statement.filename}, outside '
                f'{root}')
      if statement.filename not in location.line_content:
        _refuse(path, location, 'an include must be written on one line')
      line = location.line_num  # 1-based: its text ends before this line.
      parts.append(('\n' * start + ''.join(lines[start:line - 1]), path))
      parts.extend(_checked_parts(real, root, depth + 1))
      start = line
    elif isinstance(statement, (config_parser.BindingStatement,
                                config_parser.BlockDeclaration)):
      if getattr(statement, 'arg_name', None) == '':
        continue  # A macro: its value was checked while parsed.
      found = _configurable(statement.selector, path, location)
      if found is not None and not (_in(found.module, _PARTS) or
                                    found.selector in _SETTINGS):
        _refuse(path, location, f'binds {found.selector}')
    else:
      _refuse(path, location, f'{type(statement).__name__} is not a binding')
  parts.append(('\n' * start + ''.join(lines[start:]), path))
  return parts


def parse_config_safely(config_files, bindings=(), finalize=False):
  """Parses gin config files as data, then `bindings` (a user's own).

  A run's config.gin can be written by anyone who can write its directory:
  unlike `gin.parse_config_files_and_bindings`, nothing in `config_files` can
  run code. Each is read once, bounded, and may only bind the configurables of
  models, their data and training and import trax_hourglass; an `include` is
  read (and checked) only inside the including file's directory. Anything
  else is UnsafeConfigError naming the file and line; unknown configurables
  are skipped (another program's). trax's pickle readers are made safe too
  (`checkpoints.install_readers`).
  """
  checkpoints.install_readers()
  for path in config_files:
    path = os.fspath(path)
    root = os.path.realpath(os.path.dirname(path) or '.')
    for text, where in _checked_parts(path, root):
      try:
        gin.parse_config(text, skip_unknown=True)
      except SyntaxError as e:
        raise ValueError(f'{where}:{e.lineno}: gin syntax error: '
                         f'{e.msg}') from None
  gin.parse_config(list(bindings), skip_unknown=True)
  if finalize:
    gin.finalize()
