"""A training run's directory: its settings, and its gin config read back.

`check_run_settings` refuses to resume a run with other settings than it was
started with (`run.json`); `parse_run_config` reads a run's gin config back
(as data: `gin_safety`) and returns its model.
"""

import json
import os

from absl import logging
import gin
import jax

from trax_hourglass import checkpoints
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
