"""The notebooks' Colab install cell: keeps an in-range jax, says what it installed.

The cell runs here as IPython would run it, with `!pip` recorded instead of run
and the installed versions faked (nothing is installed or fetched).
"""

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import types

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

NOTEBOOKS = sorted(glob.glob(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks',
    '*.ipynb')))


def _install_cell(path):
  return nbformat.read(path, as_version=4).cells[1].source


def test_every_notebook_has_the_same_install_cell():
  assert len({_install_cell(p) for p in NOTEBOOKS}) == 1


class _Runtime:
  """A fake runtime: installed versions, and a pip that installs the package."""

  def __init__(self, versions, after_pip=None, gpu=False):
    self.versions, self.after_pip, self.gpu = dict(versions), after_pip, gpu
    self.pip = []

  def version(self, name):
    if self.versions.get(name) is None:
      raise importlib.metadata.PackageNotFoundError(name)
    return self.versions[name]

  def run(self, monkeypatch, capsys, source):
    namespace = {}

    class _Shell:
      def system(_, command):  # pylint: disable=no-self-argument
        self.pip.append(command.format(**namespace))
        self.versions.update(self.after_pip)

    installed = self.versions.get('trax_hourglass') is not None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
        (real_find_spec(name, *a) if installed else None)
        if name == 'trax_hourglass' else real_find_spec(name, *a)))
    monkeypatch.setattr(importlib.metadata, 'version', self.version)
    monkeypatch.setattr(shutil, 'which', lambda name: (
        '/usr/bin/nvidia-smi' if self.gpu and name == 'nvidia-smi' else None))
    namespace['get_ipython'] = _Shell
    exec(TransformerManager().transform_cell(source), namespace)  # pylint: disable=exec-used
    return capsys.readouterr().out


SOURCE = _install_cell(NOTEBOOKS[0])
INSTALLED = {'trax': '1.4.1', 'trax_hourglass': '0.1.0'}


def test_keeps_an_in_range_jax_and_says_what_it_installed(monkeypatch, capsys):
  runtime = _Runtime({'jax': '0.10.2', 'jaxlib': '0.10.2'}, INSTALLED, gpu=True)
  out = runtime.run(monkeypatch, capsys, SOURCE)
  (command,) = runtime.pip
  assert '[gpu]' not in command  # This jax already has the runtime's wheels.
  keep = re.search(r' -c (\S+)$', command).group(1)
  with open(keep, encoding='utf-8') as f:
    assert f.read() == 'jax==0.10.2\njaxlib==0.10.2\n'
  assert 'jax 0.10.2\n' in out and 'jaxlib 0.10.2\n' in out
  assert 'trax 1.4.1 (was not installed: installed now)' in out
  assert 'trax_hourglass 0.1.0 (was not installed: installed now)' in out
  assert 'restart' not in out


@pytest.mark.parametrize('jax, imported', [(None, False), ('0.4.30', True)])
def test_installs_the_newest_jax_where_none_in_range(monkeypatch, capsys, jax,
                                                     imported):
  for name in ('jax', 'jaxlib'):
    if imported:
      monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    else:
      monkeypatch.delitem(sys.modules, name, raising=False)
  runtime = _Runtime({'jax': jax, 'jaxlib': jax},
                     dict(INSTALLED, jax='0.10.2', jaxlib='0.10.2'), gpu=True)
  out = runtime.run(monkeypatch, capsys, SOURCE)
  (command,) = runtime.pip
  assert command.startswith('pip install -q "trax_hourglass[gpu] @ git+')
  assert ' -c ' not in command
  assert f'jax 0.10.2 (was {jax or "not installed"}: installed now)' in out
  # An old jax already imported stays in use until the runtime restarts.
  assert ('restart the runtime' in out) == imported


def test_installs_nothing_where_the_package_is_installed(monkeypatch, capsys):
  runtime = _Runtime(dict(INSTALLED, jax='0.4.38', jaxlib='0.4.38'))
  out = runtime.run(monkeypatch, capsys, SOURCE)
  assert not runtime.pip
  assert out.splitlines() == ['jax 0.4.38', 'jaxlib 0.4.38', 'trax 1.4.1',
                              'trax_hourglass 0.1.0']
