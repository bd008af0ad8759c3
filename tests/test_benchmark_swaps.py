"""Tests for benchmarks/attention_swaps.py (quick mode only).

The end-to-end test runs, as a user would,

  python benchmarks/attention_swaps.py --quick --data TEXT \
      --variants rotary,sfd --seconds 1 --eval_points 1 --out DIR

on a small text file it writes itself, and checks the exit status, the
markdown table, the JSON report and the plot. About 20-30 s per variant on a
2-core CPU (more when it is busy), mostly trax import and XLA compilation.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, 'benchmarks')
ATTENTION_SWAPS = os.path.join(BENCHMARKS, 'attention_swaps.py')


def _load(name):
  """Imports benchmarks/<name>.py (benchmarks/ is not a package); no trax."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)  # attention_swaps does `import _common`.
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(BENCHMARKS, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _table_rows(stdout):
  """Markdown table rows of the benchmark output, as {variant: [cells]}."""
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('| ') and cells[0] not in ('variant', ':---'):
      rows[cells[0]] = cells
  return rows


def _write_text(path, n_bytes=40_000, seed=0):
  """Deterministic English-like text: words drawn with a Zipf-ish law."""
  words = ('the of and to in a is that for it as was with be by on not he '
           'this are or his from at which but have an they you were her she '
           'there been one all we their has would when if so no more hourglass '
           'transformer attention shortened layers sequence model bytes').split()
  rng = np.random.default_rng(seed)
  probs = 1. / np.arange(1, len(words) + 1)
  picks = rng.choice(len(words), size=n_bytes // 3, p=probs / probs.sum())
  text = ' '.join(words[i] for i in picks).replace(' the ', '. The ')
  path.write_bytes(text.encode()[:n_bytes])


def test_attention_swaps_quick(tmp_path):
  data = tmp_path / 'text.txt'
  _write_text(data)
  out = tmp_path / 'out'
  variants = ['rotary', 'sfd']  # sfd trains the default, relative attention.
  result = subprocess.run(
      [sys.executable, ATTENTION_SWAPS, '--quick', '--data', str(data),
       '--variants', ','.join(variants), '--seconds', '1', '--eval_points', '1',
       '--out', str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  header = next(line for line in result.stdout.splitlines()
                if line.startswith('| variant |'))
  assert 'valid bits/byte' in header and 'tokens/s' in header, details
  rows = _table_rows(result.stdout)
  for v in variants:
    bits = float(rows[v][2])
    assert 0 < bits < 8.5, details  # Near log2(256) = 8 untrained.
    assert float(rows[v][3].replace(',', '')) > 0, details  # tokens/s
    assert int(rows[v][4].replace(',', '')) > 2, details  # steps
  assert 0 < float(rows['sfd@2'][2]) < 8.5, details
  assert 'Command: python benchmarks/attention_swaps.py --quick' in (
      result.stdout), details

  report = json.loads((out / 'attention_swaps.json').read_text())
  assert report['failed'] == {}
  for v in variants:
    r = report['results'][v]
    assert r['status'] == 'ok' and r['variant'] == v
    assert r['n_params'] > 0 and r['peak_rss_mib'] > 0
    assert r['train_s'] >= 0.5  # Trained about --seconds, not just compiled.
    curve = r['curve']  # Before the timed training, and at its end.
    assert [p['timed_steps'] > 0 for p in curve] == [False, True]
    assert curve[-1]['step'] == r['steps']
    assert all(math.isfinite(p['bits_per_byte']) for p in curve)
    assert 7 < curve[0]['bits_per_byte'] < 9  # ~log2(256): barely trained.
    assert curve[-1]['bits_per_byte'] < curve[0]['bits_per_byte']
    assert r['valid_bytes'] == int(0.95 * 40_000) - int(0.9 * 40_000)
  assert report['results']['sfd']['hierarchy_at_2'] == '1@1 1@2 1@1'
  assert 'bits_per_byte_at_2' not in report['results']['rotary']
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert 'no plot' in result.stdout
  else:
    png = (out / 'attention_swaps.png').read_bytes()
    assert png.startswith(b'\x89PNG')


def test_attention_swaps_rejects_bad_flags(tmp_path):
  swaps = _load('attention_swaps')
  data = tmp_path / 'text.txt'
  _write_text(data, n_bytes=20_000)
  with pytest.raises(SystemExit, match='--data PATH is required'):
    swaps.main(['--quick'])
  with pytest.raises(SystemExit, match='no such file'):
    swaps.main(['--quick', '--data', str(tmp_path / 'missing')])
  with pytest.raises(SystemExit, match='Unknown'):
    swaps.main(['--quick', '--data', str(data), '--variants', 'flash'])
  with pytest.raises(SystemExit, match='divisible'):
    swaps.main(['--quick', '--data', str(data), '--seq_len', '45',
                '--variants', 'sfd'])
  with pytest.raises(SystemExit, match='lsh_chunk_len'):
    swaps.main(['--quick', '--data', str(data), '--seq_len', '60',
                '--variants', 'lsh'])
  with pytest.raises(SystemExit, match='exactly one shortened level'):
    swaps.main(['--quick', '--data', str(data), '--hierarchy', '1@2 1@4 1@2',
                '--seq_len', '48', '--variants', 'sfd'])
  with pytest.raises(SystemExit, match='too small'):
    swaps.main(['--quick', '--data', str(data), '--seq_len', '1200',
                '--variants', 'relative'])
  assert swaps._sfd_hierarchies('2@1 4@3 2@1') == (3, '2@1 4@2 2@1')
  for v in swaps.ALL_VARIANTS:
    assert swaps.describe(v, swaps.REFERENCE)
