"""A training run's directory: its settings, and its model loaded back.

`check_run_settings` refuses to resume a run with other settings than it was
started with (`run.json`). `load_run` reads a run's gin config once (as data:
`gin_safety`) and its committed checkpoint, and returns its model in any mode
with the weights, and its vocabulary size from the config:

    run = runs.load_run('~/runs/hg_enwik8', mode='predict', max_len=1024)
    run.model, run.vocab_size, run.checkpoint.step
"""

import inspect
import json
import os
import typing

from absl import logging
import gin
import jax
import numpy as np
from trax import shapes

from trax_hourglass import checkpoints
from trax_hourglass.layers import attention_types
from trax_hourglass.models.hourglass import HourglassLM
from trax_hourglass.models.levels import DynamicLevel
# pylint: disable=unused-import,g-importing-member
# Also importable from here, where they lived before (scripts name `runs.*`).
from trax_hourglass.gin_safety import parse_config_safely
from trax_hourglass.gin_safety import UnsafeConfigError
from trax_hourglass.progress import final_sample
from trax_hourglass.progress import ProgressReporter
from trax_hourglass.progress import SaveOnSignal
from trax_hourglass.progress import saving_on_signals
from trax_hourglass.progress import stop_requested
from trax_hourglass.progress import TrainingStopped
# pylint: enable=unused-import,g-importing-member


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


def parse_run_config(config_files, bindings=(), finalize=False):
  """Parses a run's gin config(s), then `bindings`; returns its train.model
  function.

  Clears gin's config first, so that bindings of an earlier model do not leak
  into this one. Configurables of other programs are skipped. Not finalized
  (locked) unless asked: building a model may still import modules that
  register configurables, which a locked config refuses.
  """
  for path in config_files:
    if not os.path.exists(path):
      raise FileNotFoundError(f'gin config {path} does not exist.')
  gin.clear_config()
  parse_config_safely(config_files, bindings, finalize=finalize)
  try:
    model = gin.query_parameter('train.model')
  except ValueError:
    model = None
  if model is None:
    raise ValueError(f'gin config {", ".join(config_files)} binds no '
                     'train.model; pass a training config, or model_fn.')
  return model.scoped_configurable_fn


def _bound_vocab_size():
  """train.model's vocab_size as the parsed config binds it (scopes and
  macros resolved, as gin will call it), else its default; None if neither."""
  ref = gin.query_parameter('train.model')
  bindings = gin.get_bindings(ref.scoped_selector, resolve_references=True,
                              inherit_scopes=True)
  if 'vocab_size' in bindings:
    return bindings['vocab_size']
  return _default_vocab_size(ref.configurable.wrapped)


def _default_vocab_size(model_fn):
  model_fn, keywords = attention_types.unwrap_partial(model_fn)
  if 'vocab_size' in keywords:
    return keywords['vocab_size']
  try:
    default = inspect.signature(model_fn).parameters['vocab_size'].default
  except (KeyError, TypeError, ValueError):
    return None
  return None if default is inspect.Parameter.empty else default


def is_our_hourglass(model_fn):
  """Whether `model_fn` (maybe partial, or gin's wrapper) is our HourglassLM."""
  model_fn, _ = attention_types.unwrap_partial(model_fn)
  if model_fn is HourglassLM:
    return True
  wrapped = getattr(model_fn, '__wrapped__', None)  # gin's scoped function.
  return wrapped is not None and is_our_hourglass(wrapped)


def _has_dynamic_levels(layer):
  return isinstance(layer, DynamicLevel) or any(
      _has_dynamic_levels(sublayer) for sublayer in layer.sublayers)


class RunConfig(typing.NamedTuple):
  """A run's model as its gin config (parsed once) and arguments make it.

  Attributes:
    files: the gin configs parsed (none when `model_fn` was given alone).
    model_fn: train.model of the config, or the one given.
    vocab_size: the model's vocabulary, from `model_kwargs`, else the
      config's binding, else model_fn's default; None if none says.
    model_kwargs: arguments for model_fn, over the config's.
  """
  files: tuple
  model_fn: typing.Callable
  vocab_size: typing.Optional[int]
  model_kwargs: dict

  def build(self, mode, max_len=None):
    """The model in `mode`, not initialised. `max_len` sizes our
    HourglassLM's predict caches; other models keep their configured one
    (trax's TransformerLM's sizes weights), and so do dynamic-pooling
    models, whose bound on segments counts from it (a smaller one would
    compute other numbers than the trained model past its bound)."""
    kwargs = dict(self.model_kwargs, mode=mode)
    if max_len is not None and is_our_hourglass(self.model_fn):
      kwargs['max_len'] = max_len
    try:
      model = self.model_fn(**kwargs)
      if 'max_len' in kwargs and _has_dynamic_levels(model):
        del kwargs['max_len']
        model = self.model_fn(**kwargs)
      return model
    except TypeError as e:  # E.g. no vocab_size: no config and no kwargs.
      raise ValueError(
          f'cannot build the model ({e}); pass the run\'s gin config '
          '(config_file) or the model arguments, e.g. vocab_size=256.') from e

  def described(self):
    """What the model was built from, for errors."""
    return (f'config {", ".join(self.files)}' if self.files else
            f'arguments {self.model_kwargs}')


def read_config(config_files=(), bindings=(), model_fn=None, finalize=False,
                **model_kwargs):
  """The `RunConfig` of gin `config_files` (parsed once, as data, replacing
  gin's global config) and `bindings`, or of `model_fn` and `model_kwargs`
  alone (default model_fn: `HourglassLM`)."""
  files = tuple(os.path.expanduser(os.fspath(c)) for c in config_files)
  if files:
    from_config = parse_run_config(files, bindings, finalize)
  vocab = model_kwargs.get('vocab_size')
  if model_fn is None and files:
    model_fn = from_config
    if vocab is None:
      vocab = _bound_vocab_size()
  model_fn = model_fn or HourglassLM
  if vocab is None:
    vocab = _default_vocab_size(model_fn)
  return RunConfig(files, model_fn, vocab, dict(model_kwargs))


def read_weights(source):
  """(flat numpy weights, where, checkpoint) of a run's committed checkpoint
  (`source`: output dir or *.pkl.gz file), or of weights given (checkpoint
  None). A diverged run's are refused (they would sample garbage silently).
  """
  if not isinstance(source, (str, os.PathLike)):
    weights, where, ckpt = source, 'the given weights', None
  else:
    path = os.path.expanduser(os.fspath(source))
    ckpt = checkpoints.read_checkpoint_at(path)
    weights = [np.asarray(w) for w in checkpoints.from_bits(
        ckpt.flat_weights)]
    where = f'{path} (step {ckpt.step})'
  checkpoints.check_finite(jax.tree_util.tree_leaves(weights), where)
  return weights, where, ckpt


class LoadedRun(typing.NamedTuple):
  """`load_run`'s result: the model with its weights, its vocabulary size
  (from the config), its checkpoint (None for weights given) and config."""
  model: typing.Any
  vocab_size: typing.Optional[int]
  checkpoint: typing.Optional[checkpoints.Checkpoint]
  config: RunConfig


def load_run(source, mode='predict', config_files=None, bindings=(), *,
             config=None, max_len=2048, batch_size=1, original=False,
             finalize=False, model_fn=None, **model_kwargs):
  """Builds a run's model in `mode` and loads its trained weights.

  Args:
    source: a training output dir (its committed `model` checkpoint, read
      crash-safely), a `*.pkl.gz` checkpoint file, or weights (nested or a
      flat list of arrays; predict mode only).
    mode: 'predict' (initialised for (batch_size, 1) inputs), 'eval' or
      'train' (initialised as the checkpoint was saved).
    config_files: the run's gin config(s); default `config.gin` beside the
      checkpoint (the trainer writes it there), unless `model_fn` is given or
      `original`. Parsed once, replacing gin's global config.
    bindings: gin bindings over the config's (a user's own).
    config: a `RunConfig` already read (then no config is parsed here).
    max_len: longest sequence (prompt + new tokens) of our HourglassLM in
      predict mode, the size of its caches.
    batch_size: predict mode: sequences per call.
    original: the checkpoint was written by trax's own HourglassLM (e.g. a
      released one); give the architecture with `config_files` or
      `model_kwargs`.
    finalize: lock gin's config after parsing.
    model_fn, **model_kwargs: as in `read_config`.

  Returns:
    A `LoadedRun`: model, vocab_size, checkpoint, config.
  """
  path = None
  if isinstance(source, (str, os.PathLike)):
    path = os.path.expanduser(os.fspath(source))
    if not os.path.exists(path):
      raise FileNotFoundError(f'checkpoint {path} does not exist; pass a '
                              'training output_dir or a model.pkl.gz file.')
  if config is None:
    if (config_files is None and model_fn is None and not original and
        path is not None and os.path.exists(run_config(path))):
      config_files = [run_config(path)]
    if isinstance(config_files, (str, os.PathLike)):
      config_files = [config_files]
    config = read_config(config_files or (), bindings, model_fn, finalize,
                         **model_kwargs)
  # Read the weights first: a missing checkpoint fails before any building.
  if mode != 'predict':
    return _load_trained(path, mode, config)
  weights, where, ckpt = read_weights(source)
  model = config.build('predict', max_len)
  model.init(shapes.ShapeDtype((batch_size, 1), np.int32))
  try:
    checkpoints.load_trax_hourglass_weights(model, weights)
  except ValueError as e:
    raise ValueError(f'the weights of {where} do not fit the model built '
                     f'from {config.described()}: {e}') from e
  return LoadedRun(model, config.vocab_size, ckpt, config)


def _load_trained(path, mode, config):
  """`load_run` in a training mode: as trax's `init_from_file`, checked."""
  if path is None:
    raise ValueError(f'mode={mode!r} loads a checkpoint; pass its path (or '
                     "use mode='predict' for weights).")
  ckpt = checkpoints.read_checkpoint_at(path)
  checkpoints.check_finite(
      checkpoints.from_bits(ckpt.flat_weights),
      f'{os.path.join(ckpt.path, "model.weights.npy.gz")} (step {ckpt.step})')
  model = config.build(mode)
  checkpoints.init_from_file(model, ckpt)  # As read and checked above.
  return LoadedRun(model, config.vocab_size, ckpt, config)


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
