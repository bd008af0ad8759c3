"""Stand-ins for TensorFlow, TFDS, TF Text and gym where they are not installed.

trax 1.4.1 imports all four when it is imported, but the benchmarks of
`benchmarks/device/run.sh` use none of them: their data are random tokens in
memory, and trax's training loop only needs `tf.io.gfile` for its output
directory, given here for local paths. Accelerator images without TensorFlow
(it is too large to carry) put this folder on PYTHONPATH (run.sh does, and only
when `import tensorflow` fails), so every Python process, benchmark workers
included, runs this file at start-up.

A stand-in is a class: any attribute of it is another stand-in, calling it
returns one, and nothing is an instance of it, so trax's import-time
registrations and `isinstance` checks pass and do nothing. Never use this where
TensorFlow does real work (the data pipelines, TFDS).
"""

import glob
import importlib.abc
import importlib.machinery
import os
import shutil
import sys
import types

_ABSENT = ('tensorflow', 'tensorflow_datasets', 'tensorflow_text', 'gym')


class _StandIn(type):

  def __getattr__(cls, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _stand_in(f'{cls.__qualname__}.{attr}')

  def __call__(cls, *args, **kwargs):
    if cls.__dict__.get('_stand_in'):
      return _stand_in(f'{cls.__qualname__}()')
    return super().__call__(*args, **kwargs)  # A subclass an importer defined.


def _stand_in(name):
  return _StandIn(name, (), {'__qualname__': name, '_stand_in': True})


def _gfile():
  """`tf.io.gfile` for local paths: what trax's `training.Loop` uses."""
  gfile = types.ModuleType('tensorflow.io.gfile')
  gfile.GFile = open
  gfile.exists = os.path.exists
  gfile.isdir = os.path.isdir
  gfile.listdir = os.listdir
  gfile.makedirs = lambda path: os.makedirs(path, exist_ok=True)
  gfile.mkdir = os.mkdir
  gfile.remove = os.remove
  gfile.rmtree = shutil.rmtree
  gfile.glob = glob.glob
  gfile.walk = os.walk
  gfile.rename = lambda src, dst, overwrite=False: (
      os.replace if overwrite else os.rename)(src, dst)
  gfile.copy = lambda src, dst, overwrite=False: shutil.copyfile(src, dst)
  io = types.ModuleType('tensorflow.io')
  io.gfile = gfile
  return io


_IO = _gfile()


class _Module(types.ModuleType):

  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    if attr == 'io' and self.__name__.startswith('tensorflow'):
      return _IO  # tf.io, tf.compat.v2.io, ...
    return _stand_in(f'{self.__name__}.{attr}')


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, name, path, target=None):
    del path, target
    if name.split('.')[0] in _ABSENT:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    return _Module(spec.name)

  def exec_module(self, module):
    module.__path__ = []


def _chain():
  """Runs the next `sitecustomize` on sys.path, which this file shadows."""
  here = os.path.dirname(os.path.abspath(__file__))
  for entry in sys.path:
    path = os.path.join(entry or '.', 'sitecustomize.py')
    if os.path.abspath(entry or '.') != here and os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        exec(compile(f.read(), path, 'exec'), {'__name__': 'sitecustomize',  # pylint: disable=exec-used
                                               '__file__': path})
      return


sys.meta_path.append(_Finder())  # Last: an installed package always wins.
_chain()
