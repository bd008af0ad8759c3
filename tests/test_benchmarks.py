"""Tests for the benchmark scripts in `benchmarks/` (quick mode only).

The end-to-end tests run, e.g.,

  python benchmarks/train_speed.py --quick --models original,transformer6

as a subprocess (as a user would) and check that it exits 0 and prints a
markdown table with a positive tokens/s for every requested model. Each model
costs roughly 30-60 s on a 2-core CPU, mostly trax import and XLA compilation.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO_ROOT, 'benchmarks')
TRAIN_SPEED = os.path.join(BENCHMARKS, 'train_speed.py')
SAMPLE_SPEED = os.path.join(BENCHMARKS, 'sample_speed.py')


def _load(name):
  """Imports benchmarks/<name>.py (benchmarks/ is not a package); no trax."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)  # train_speed does `import _common`.
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(BENCHMARKS, name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _table_rows(stdout):
  """Markdown table rows of the benchmark output, as {model: [cells]}."""
  rows = {}
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('| ') and cells[0] not in ('model', ':---'):
      rows[cells[0]] = cells
  return rows


@pytest.mark.parametrize('models', [  # The baselines' path: -m slow.
    pytest.param('original,transformer6', marks=pytest.mark.slow), 'ours'])
def test_train_speed_quick(models, tmp_path):
  json_path = tmp_path / 'train_speed.json'
  result = subprocess.run(
      [sys.executable, TRAIN_SPEED, '--quick', '--models', models,
       '--json', str(json_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  rows = _table_rows(result.stdout)
  header = next(line for line in result.stdout.splitlines()
                if line.startswith('| model |'))
  assert 'tokens/s' in header, details
  for model in models.split(','):
    assert model in rows, details
    tokens_per_s = float(rows[model][2].replace(',', ''))
    assert tokens_per_s > 0, details

  report = json.loads(json_path.read_text())
  for model in models.split(','):
    summary = report['summary'][model]
    assert summary['n_runs'] == 1
    assert summary['tokens_per_s_median'] > 0
    assert summary['peak_rss_mib_max'] > 0
    assert summary['n_params'] > 0
  if 'original' in models and 'transformer6' in models:
    s = report['summary']
    assert s['original']['ratio_vs_original'] == pytest.approx(1.0)
    assert s['transformer6']['ratio_vs_original'] == pytest.approx(
        s['transformer6']['tokens_per_s_median']
        / s['original']['tokens_per_s_median'])


def test_train_speed_rejects_bad_flags():
  train_speed = _load('train_speed')
  with pytest.raises(SystemExit, match='divisible'):
    train_speed.main(['--models', 'original', '--seq_len', '100'])
  with pytest.raises(SystemExit, match='warmup'):
    train_speed.main(['--quick', '--warmup', '1'])
  with pytest.raises(SystemExit, match='Unknown'):
    train_speed.main(['--models', 'gpt2'])


def test_sample_speed_quick(tmp_path):
  # Both decoding paths and a baseline (each worker costs ~10 s of imports).
  models = ['ours', 'ours_sample', 'original']
  json_path = tmp_path / 'sample_speed.json'
  result = subprocess.run(
      [sys.executable, SAMPLE_SPEED, '--quick', '--models', ','.join(models),
       '--json', str(json_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  rows = _table_rows(result.stdout)
  header = next(line for line in result.stdout.splitlines()
                if line.startswith('| model |'))
  assert 'tokens/s' in header, details
  for model in models:
    assert float(rows[model][2].replace(',', '')) > 0, details
  assert 'ours / original: ' in result.stdout

  report = json.loads(json_path.read_text())
  s = report['summary']
  for model in models:
    assert s[model]['n_runs'] == 1 and s[model]['tokens_per_s_median'] > 0
    assert s[model]['n_params'] > 0
  assert s['ours']['n_params'] == s['original']['n_params']
  assert s['ours']['ratio_vs_original'] == pytest.approx(
      s['ours']['tokens_per_s_median'] / s['original']['tokens_per_s_median'])
  runs = {r['model']: r for r in report['runs']}
  assert runs['ours']['timed_tokens'] == 24 - 2  # The 2 warmup tokens.
  assert runs['original']['timed_tokens'] == 4


def test_sample_speed_rejects_bad_flags():
  sample_speed = _load('sample_speed')
  with pytest.raises(SystemExit, match='max_len'):
    sample_speed.main(['--n_tokens', '100', '--max_len', '50'])
  with pytest.raises(SystemExit, match='warmup'):
    sample_speed.main(['--quick', '--warmup', '0'])
  with pytest.raises(SystemExit, match='Unknown'):
    sample_speed.main(['--models', 'gpt2'])


def test_common_helpers():
  common = _load('_common')
  assert common.parse_int_tuple('2,2') == (2, 2)
  assert common.parse_int_tuple('(1, 3)') == (1, 3)
  assert common.max_shorten_factor('8@3') == 3
  assert common.max_shorten_factor('2@1 8@3 2@1') == 3
  assert common.max_shorten_factor('weird') is None
  assert common.median([3., 1., 2.]) == 2.
  assert common.fmt(None) == 'n/a'
  assert common.fmt(1.234, '.2f', suffix='x') == '1.23x'
  table = common.markdown_table(['model', 'tokens/s'], [['a', '1,000']])
  assert table.splitlines() == [
      '| model | tokens/s |', '| :--- | ---: |', '| a | 1,000 |']
  line = common.RESULT_PREFIX + json.dumps({'model': 'a', 'status': 'ok'})
  assert common.parse_result(f'noise\n{line}\nmore noise\n') == {
      'model': 'a', 'status': 'ok'}
  assert common.parse_result('no result here') is None
