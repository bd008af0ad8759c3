"""The equal-time `boundaries` suite and benchmarks/boundaries.py (quick only).

The end-to-end test runs, as a user would,

  python benchmarks/equal_time.py --quick --data TEXT --suite boundaries \
      --variants whitespace,gumbel --seconds 1 --eval_points 1 \
      --clock cpu --jobs 2 --out DIR
  python benchmarks/boundaries.py DIR/equal_time.json

on a small text file it writes itself: dynamic pooling trains, scores, is
causal (no leak), and reports the shortening it achieved and its boundaries
over a paragraph, which the picture script draws. The whole suite, unigram
included (its SentencePiece model trained on the text), is a slow test.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

import benchmark_scripts  # pylint: disable=g-bad-import-order
from benchmark_scripts import REPO_ROOT  # pylint: disable=g-bad-import-order
import test_benchmark_equal_time  # pylint: disable=g-bad-import-order

EQUAL_TIME = benchmark_scripts.path('equal_time')
BOUNDARIES = benchmark_scripts.path('boundaries')


def test_fixed_factor_is_the_divisor_nearest_the_whitespace_segments(tmp_path):
  boundaries = benchmark_scripts.load('boundaries')
  data = tmp_path / 'text.txt'
  # Train split (90%): one space in 4 bytes; the rest is never read.
  data.write_bytes(b'abc ' * 900 + b'x' * 400)
  assert boundaries.fixed_factor(str(data), 48) == (4.0, 4)
  assert boundaries.fixed_factor(str(data), 42) == (4.0, 3)  # 3 before 6.
  data.write_bytes(b'abcdefg\n' * 900 + b' ' * 800)
  assert boundaries.fixed_factor(str(data), 336) == (8.0, 8)


def _report(tmp_path):
  """A boundaries-suite equal_time.json as the workers write it."""
  text = 'The cat sat. On the mat.'
  results = {
      'fixed': dict(status='ok', variant='fixed', test_bits_per_byte=2.5,
                    segment_length=4.0, past_bound=0.0, shortened_length=6,
                    paragraph=dict(offset=900, text=text,
                                   ends=[4, 8, 12, 16, 20, 24])),
      'whitespace': dict(status='ok', variant='whitespace',
                         test_bits_per_byte=2.25, segment_length=4.5,
                         past_bound=0.001, shortened_length=13,
                         paragraph=dict(offset=900, text=text,
                                        ends=[4, 8, 13, 16, 20])),
      'gumbel': dict(status='error', variant='gumbel', reason='boom')}
  path = tmp_path / 'equal_time.json'
  path.write_text(json.dumps(dict(
      config=dict(data='/x/text.txt', seconds=60, d_model=32,
                  boundary_factor=4),
      variants=['fixed', 'whitespace', 'gumbel'], results=results)))
  return path


def test_picture_and_table_from_the_benchmark_results(tmp_path, capsys):
  boundaries = benchmark_scripts.load('boundaries')
  png = tmp_path / 'b.png'
  assert boundaries.main([str(_report(tmp_path)), '--out', str(png)]) == 0
  out = capsys.readouterr().out
  rows = benchmark_scripts.table_rows(out, 'variant')
  assert rows['fixed'][1:] == ['2.500', '4.00', '6', '0.00%']
  assert rows['whitespace'][1:] == ['2.250', '4.50', '13', '0.10%']
  assert 'gumbel' not in rows  # It failed: no row, no picture row.
  # A second run's variants join the first's (the first file's win).
  second = tmp_path / 'second.json'
  report = json.loads(_report(tmp_path).read_text())
  report['results']['gumbel'] = dict(report['results']['fixed'],
                                     variant='gumbel', segment_length=3.0)
  report['results']['fixed']['segment_length'] = 99.
  second.write_text(json.dumps(report))
  assert boundaries.main([str(_report(tmp_path)), str(second), '--out',
                          str(png)]) == 0
  rows = benchmark_scripts.table_rows(capsys.readouterr().out, 'variant')
  assert [rows[v][2] for v in ('fixed', 'whitespace', 'gumbel')] == [
      '4.00', '4.50', '3.00']
  # Position t holds byte t-1: an end at t cuts after byte t-1.
  assert 'whitespace: The |cat |sat. |On |the |mat.' in out
  assert '     fixed: The |cat |sat.| On |the |mat.|' in out
  assert png.read_bytes().startswith(b'\x89PNG')
  with pytest.raises(SystemExit):
    boundaries.main([str(tmp_path / 'missing.json')])


@pytest.mark.parametrize('variants', [  # One worker; all five: -m slow.
    ('whitespace',),
    pytest.param(None, marks=pytest.mark.slow)])
def test_boundaries_suite_quick(tmp_path, variants):
  data = tmp_path / 'text.txt'
  test_benchmark_equal_time._write_text(data)  # pylint: disable=protected-access
  out = tmp_path / 'out'
  equal_time = benchmark_scripts.load('equal_time')
  chosen = ['--variants', ','.join(variants)] if variants else []
  variants = variants or equal_time.SUITES['boundaries']
  result = subprocess.run(
      [sys.executable, EQUAL_TIME, '--quick', '--data', str(data),
       '--suite', 'boundaries', '--seconds', '1', '--eval_points', '1',
       '--clock', 'cpu', '--jobs', '2', '--out', str(out)] + chosen,
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  report = json.loads((out / 'equal_time.json').read_text())
  cfg = report['config']
  raw = data.read_bytes()
  train = np.frombuffer(raw[:int(0.9 * len(raw))], np.uint8)
  mean = 1 / np.isin(train, [32, 9, 13, 10]).mean()
  assert cfg['whitespace_segment'] == pytest.approx(mean)
  k = cfg['boundary_factor']
  assert cfg['seq_len'] % k == 0 and abs(k - mean) <= 1.5
  test = raw[int(0.95 * len(raw)):]
  for v in variants:
    r = report['results'][v]
    assert r['status'] == 'ok', details
    factor = cfg['unigram_factor'] if v == 'unigram' else k
    assert f"'1@1 1@{factor} 1@1'" in report['descriptions'][v]
    assert 0 < r['test_bits_per_byte'] < 8.5
    # Segments are closed only from the past: hiding the future costs 0.
    assert abs(r['leak_bits_per_byte']) < 1e-6, (v, details)
    assert r['segment_length'] > 1 and 0 <= r['past_bound'] <= 1
    p = r['paragraph']
    start = p['offset'] - (len(raw) - len(test))  # In the test split.
    assert test[start:start + cfg['seq_len']] == p['text'].encode('latin-1')
    assert set(p['ends']) <= set(range(cfg['seq_len']))
  if 'fixed' in variants:  # Every k positions, whatever the text.
    assert report['results']['fixed']['segment_length'] == k
  if 'unigram' in variants:  # Its own k, from its targets on the train split.
    assert abs(cfg['unigram_factor'] - cfg['unigram_segment']) <= 1.5
  # Whitespace segments end after each whitespace byte, nowhere else.
  r = report['results']['whitespace']
  text = r['paragraph']['text'].encode('latin-1')
  assert r['paragraph']['ends'] == [i + 1 for i, b in enumerate(text[:-1])
                                    if b in b' \t\r\n']
  rows = benchmark_scripts.table_rows(result.stdout, 'variant')
  assert rows['whitespace'][2] == f'{r["segment_length"]:.2f}', details

  picture = subprocess.run(
      [sys.executable, BOUNDARIES, str(out / 'equal_time.json')],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert picture.returncode == 0, picture.stderr
  assert (out / 'boundaries.png').read_bytes().startswith(b'\x89PNG')
  assert 'whitespace: ' in picture.stdout and '|' in picture.stdout
