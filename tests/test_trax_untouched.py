"""trax's training machinery stays as trax ships it (issue 30).

`trax_hourglass.Loop` is a subclass; nothing of trax's `training.Loop`, the
module functions of `trax.supervised.training`, `trainer_lib` and
`trax.data.inputs`, or `Layer.init_from_file` is replaced, neither by
`import trax_hourglass` nor by a training run (whose scoped swaps are undone).
"""

import inspect
import os

import gin

import trax_hourglass  # pylint: disable=unused-import (imported as users do)
from trax_hourglass.cli import trainer

# pylint: disable=g-import-not-at-top,wrong-import-order
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import trainer_lib
from trax.supervised import training

from configurations import TINY_GIN  # pylint: disable=g-bad-import-order

_OURS = os.path.dirname(os.path.abspath(trax_hourglass.__file__))


def _functions(owner):
  """{name: function} of `owner`'s namespace (a module or a class)."""
  return {name: value for name, value in vars(owner).items()
          if inspect.isfunction(value)}


def _defined_by_us():
  """'owner.name' of each training attribute whose code is this package's."""
  found = []
  owners = [training, trainer_lib, trax_inputs]
  owners += [value for value in vars(training).values()
             if inspect.isclass(value) and value.__module__ == training.__name__]
  checked = {f'{getattr(o, "__name__", o)}.{name}': fn
             for o in owners for name, fn in _functions(o).items()}
  checked['Layer.init_from_file'] = base.Layer.init_from_file
  checked['training.Loop'] = training.Loop.__init__
  for where, fn in checked.items():
    code = fn.__code__  # Not unwrapped: a wrapper of ours is ours.
    if os.path.abspath(code.co_filename).startswith(_OURS + os.sep):
      found.append(where)
  return sorted(found)


def test_import_and_training_replace_nothing_of_trax_training(tmp_path):
  assert training.Loop.__module__ == 'trax.supervised.training'
  assert _defined_by_us() == []  # After `import trax_hourglass`.
  corpus = tmp_path / 'corpus.txt'
  corpus.write_bytes(b'the quick brown fox jumps over the lazy dog. ' * 50)
  config = tmp_path / 'tiny.gin'
  config.write_text(TINY_GIN.format(steps=2, batch=2, eval_frequency=2))
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    assert trainer.main(['--config_file', str(config), '--output_dir',
                         str(tmp_path / 'run'),
                         f"--config=byte_file_inputs.path='{corpus}'"]) == 0
  finally:
    gin.clear_config()
  assert training.Loop.__module__ == 'trax.supervised.training'
  assert _defined_by_us() == []  # After a training run.
  # The trainer trained with ours, a subclass.
  assert os.path.islink(tmp_path / 'run' / 'model.pkl.gz')
