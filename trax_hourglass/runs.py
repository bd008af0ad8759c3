"""Run-directory helpers: what a training run prints, where its files are.

`ProgressReporter` is the trainer's compact progress line (a trax training
callback), `final_sample` what it samples at the end; both are gin
configurables under `trax_hourglass`, registered on `import trax_hourglass`, so
a run's gin files parse anywhere (a notebook, trax's own trainer).
`parse_run_config` reads a run's gin config back and returns its model;
`parse_config_safely` reads gin configs as data (`_PARTS`, `_SETTINGS`).
"""

import datetime
import math
import os
import time
import tokenize

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
             f'{per_step:.2f} s/step', f'left {_format_duration(left)}']
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
      included = os.path.join(os.path.dirname(path), statement.filename)
      real = os.path.realpath(included)
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
