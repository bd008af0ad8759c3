"""The demo notebooks (notebooks/*.ipynb) run end to end in smoke mode.

Each notebook is executed top to bottom with nbclient in a fresh Python 3
kernel running this interpreter, with `TRAX_HOURGLASS_SMOKE=1` (every size
tiny), in a temporary working directory (everything the notebook writes goes
there, nothing into the repository), on data made here or by the notebook's
own fallback, never on ../shared. A cell that raises fails the test; each
notebook must show at least one picture (an image/png output).
"""

import glob
import json
import os
import sys
import time

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = sorted(os.path.basename(p)
                   for p in glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
KERNEL_NAME = 'trax-hourglass-test-python3'
CELL_TIMEOUT_S = 600
SMOKE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                   '--xla_llvm_disable_expensive_passes=true')


def _byte_file(path):
  """~200 KB of XML-like text in the shape of enwik8 (made here)."""
  words = ('the of and in to was is for on as by with he that at from his it an'
           ' were are which this also be has or had first one their its new '
           'after who they two her she been other when there all during into '
           'school time may years more most only over city some world would '
           'where later up such used many can state about national out known '
           'university united then made').split()
  words = [w.encode() for w in words]
  rng_state = 12345
  parts = []
  for page in range(400):
    body = []
    for _ in range(80):
      rng_state = (rng_state * 1103515245 + 12345) % 2**31
      body.append(words[rng_state % len(words)])
    parts.append(b'  <page>\n    <title>Page %d</title>\n    <id>%d</id>\n'
                 b'    <text xml:space="preserve">%s.</text>\n  </page>\n'
                 % (page, page + 1, b' '.join(body).capitalize()))
  with open(path, 'wb') as f:
    f.write(b'<mediawiki>\n' + b''.join(parts) + b'</mediawiki>\n')
  return path


def _kernel_spec(directory):
  """A kernelspec that runs ipykernel with this very interpreter."""
  spec_dir = os.path.join(directory, 'kernels', KERNEL_NAME)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, 'kernel.json'), 'w') as f:
    json.dump({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
                        '{connection_file}'],
               'display_name': 'Python 3 (trax_hourglass tests)',
               'language': 'python'}, f)
  return directory


def test_there_are_notebooks():
  assert {'hourglass_enwik8.ipynb', 'hourglass_images.ipynb',
          'attention_swaps.ipynb'} <= set(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source
  assert 'colab.research.google.com/assets/colab-badge.svg' in nb.cells[0].source
  assert 'REPO_URL' in nb.cells[1].source  # The Colab install cell.


# enwik8 by default and in the smoke subset (-m smoke). The others repeat its
# steps (train with trax's Loop, evaluate, sample) on other data or for every
# attention (test_swaps.py trains those by default): -m slow.
_MARKS = {'hourglass_enwik8.ipynb': pytest.mark.smoke,
          'attention_swaps.ipynb': pytest.mark.slow,
          'hourglass_images.ipynb': pytest.mark.slow}


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=_MARKS[n]) if n in _MARKS else n for n in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
  work = tmp_path / 'work'
  work.mkdir()
  monkeypatch.setenv('TRAX_HOURGLASS_SMOKE', '1')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')
  # Data the notebooks read: a byte file made here for the enwik8 notebook;
  # paths that do not exist elsewhere, so that the notebooks fall back to the
  # data they make themselves (Python source text, synthetic images).
  missing = str(tmp_path / 'no-such-dir' / 'missing')
  enwik8 = (_byte_file(str(tmp_path / 'enwik8-tiny.xml'))
            if name == 'hourglass_enwik8.ipynb' else missing)
  monkeypatch.setenv('TRAX_HOURGLASS_ENWIK8', enwik8)
  monkeypatch.setenv('TRAX_HOURGLASS_CIFAR10', missing + '.npz')
  monkeypatch.setenv('TRAX_HOURGLASS_DATA_DIR', str(tmp_path / 'data_dir'))
  monkeypatch.setenv('JUPYTER_PATH', _kernel_spec(str(tmp_path / 'jupyter')))
  monkeypatch.setenv('MPLCONFIGDIR', str(tmp_path / 'matplotlib'))
  monkeypatch.delenv('MPLBACKEND', raising=False)
  # Replaces any XLA_FLAGS of the caller (jax then sees its default devices)
  # with XLA's quickest compilation: a smoke run takes so few steps that
  # compiling them is most of its time (about 2x faster in all here).
  monkeypatch.setenv('XLA_FLAGS', SMOKE_XLA_FLAGS)
  for var in ('TRAX_HOURGLASS_CHECKPOINT', 'TRAX_HOURGLASS_TRAX_CHECKPOINT'):
    monkeypatch.delenv(var, raising=False)

  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  # Last, a cell of the test's own: which Python the kernel ran.
  nb.cells.append(nbformat.v4.new_code_cell(
      'import sys\nprint("kernel python:", sys.executable)'))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
      resources={'metadata': {'path': str(work)}})
  before = sorted(os.listdir(NOTEBOOK_DIR))
  start = time.time()
  client.execute()  # Raises CellExecutionError on the first failing cell.
  print(f'{name}: {time.time() - start:.0f} s')
  assert sorted(os.listdir(NOTEBOOK_DIR)) == before  # Wrote nothing there.
  assert os.listdir(work)  # But in its working directory.

  outputs = [o for cell in nb.cells if cell.cell_type == 'code'
             for o in cell.outputs]
  errors = [o for o in outputs if o.output_type == 'error']
  assert not errors, errors
  pictures = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert pictures, f'{name} showed no picture'
  text = ''.join(o.get('text', '') for o in outputs)
  assert f'kernel python: {sys.executable}' in text
  assert 'Accelerator: CPU' in text or 'Accelerator: GPU' in text or (
      'Accelerator: TPU' in text), text[:2000]
