"""What a training run prints and how it stops: progress, signals, a sample.

`ProgressReporter` is the trainer's compact progress line, `SaveOnSignal`
(with `saving_on_signals`) makes SIGTERM and SIGINT end a run after its
current step with a committed checkpoint, `final_sample` what the trainer
samples at the end. They are trax training callbacks that `trax_hourglass.Loop`
also calls after each step with its loss (`after_step`), and gin
configurables under `trax_hourglass`, registered on `import trax_hourglass`,
so a run's gin files parse anywhere.
"""

import contextlib
import datetime
import math
import signal
import threading
import time

import gin
import jax
from jax import numpy as jnp
import numpy as np
from trax import fastmath
from trax.supervised import callbacks

from trax_hourglass import loop as hg_loop
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


def _check_calls_after_step(loop, callback):
  """Refuses a Loop that would never call `callback.after_step`."""
  if not isinstance(loop, hg_loop.Loop):
    raise TypeError(
        f'{type(callback).__name__} works with trax_hourglass.Loop (it calls '
        f'after_step with each step\'s loss); {type(loop).__module__}.'
        f'{type(loop).__name__} does not: build a trax_hourglass.Loop.')


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
    _check_calls_after_step(loop, self)
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
    return self._last_time is None  # Only to start the clock.

  def on_step_begin(self, step):
    self._last_time = time.time()  # Before the first step (and its compile).

  def on_step_end(self, step):
    pass

  def after_step(self, step, loss):
    """`trax_hourglass.Loop` calls it after each step with the loss (a device
    array, the mean over every process; read only when printing)."""
    self._losses.append(loss)
    self._maybe_print(step)

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
    _check_calls_after_step(loop, self)
    self._agreed_stop = _agreed_stop()

  def call_at(self, step):
    return False  # All work happens in after_step.

  def after_step(self, step, loss):  # pylint: disable=unused-argument
    """`trax_hourglass.Loop` calls it after each step (and the progress line)."""
    signum = self._agreed_stop(stop_requested())
    if signum:
      self._loop.save_checkpoint('model')
      raise TrainingStopped(signum, step, self._loop.output_dir)


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
