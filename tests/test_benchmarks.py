"""Tests for the benchmark scripts in `benchmarks/` (quick mode only).

The end-to-end tests run, e.g.,

  python benchmarks/train_speed.py --quick --models ours --seq_lens 48,96

as a subprocess (as a user would) and check that it exits 0 and prints a
markdown table with a positive tokens/s (and GFLOP/s) for every requested
model and length. Each model costs roughly 20-60 s on a 2-core CPU, mostly
trax import and XLA compilation. The length search of max_length.py, the
memory guard of `harness.run_worker` and the FLOP count are unit-tested
without workers.
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

import benchmark_scripts  # pylint: disable=g-bad-import-order
from benchmark_scripts import REPO_ROOT  # pylint: disable=g-bad-import-order

TRAIN_SPEED = benchmark_scripts.path('train_speed')
SAMPLE_SPEED = benchmark_scripts.path('sample_speed')
MAX_LENGTH = benchmark_scripts.path('max_length')


def _header_rows(stdout, key=('model',)):
  """The markdown table of `stdout` as {key cells: {header: cell}}."""
  lines = [l for l in stdout.splitlines() if l.startswith('| ')]
  cells = [[c.strip() for c in l.strip().strip('|').split('|')] for l in lines]
  header = next(c for c in cells if c[0] == key[0])
  rows = {}
  for row in cells:
    if row is not header and not row[0].startswith(('---', ':--')):
      named = dict(zip(header, row))
      rows[tuple(named[k] for k in key)] = named
  return rows


def _number(cell):
  return float(cell.replace(',', '').rstrip('%x'))


@pytest.mark.parametrize('models,seq_lens', [  # Baselines, 2 lengths: -m slow.
    pytest.param('original,transformer6,ours_tl_dense', '48',
                 marks=pytest.mark.slow),
    pytest.param('ours', '48,96', marks=pytest.mark.slow),
    ('ours', '48')])
def test_train_speed_quick(models, seq_lens, tmp_path):
  json_path = tmp_path / 'train_speed.json'
  result = subprocess.run(
      [sys.executable, TRAIN_SPEED, '--quick', '--models', models,
       '--seq_lens', seq_lens, '--json', str(json_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  rows = _header_rows(result.stdout, key=('length', 'model'))
  assert 'Matmul peak' in result.stdout, details
  lengths = seq_lens.split(',')
  for length in lengths:
    for model in models.split(','):
      row = rows[length, model]
      assert _number(row['tokens/s (median)']) > 0, details
      assert _number(row['GFLOP/s']) > 0, details
      assert 0 < _number(row['% of matmul peak']) < 1000, details
      assert row['status'] == 'ok', details
  # --tokens_per_step 96 (--quick): batch 2 at length 48, 1 at 96.
  assert rows[lengths[0], models.split(',')[0]]['batch'] == '2'

  report = json.loads(json_path.read_text())
  assert report['matmul_peak']['gflops_per_s'] > 0
  for length in lengths:
    for model in models.split(','):
      summary = report['summary'][length][model]
      assert summary['n_runs'] == 1
      assert summary['tokens_per_s_median'] > 0
      assert summary['peak_rss_mib_max'] > 0
      assert summary['n_params'] > 0
      assert summary['flops_per_step'] > 0
  png = tmp_path / 'train_speed.png'  # Next to --json by default.
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  if 'original' in models and 'transformer6' in models:
    s = report['summary']['48']
    assert s['original']['ratio_vs_original'] == pytest.approx(1.0)
    assert s['transformer6']['ratio_vs_original'] == pytest.approx(
        s['transformer6']['tokens_per_s_median']
        / s['original']['tokens_per_s_median'])
  if 'ours_tl_dense' in models:  # The ablation is our model, weights and all.
    s = report['summary']['48']
    assert s['ours_tl_dense']['n_params'] == s['original']['n_params']


def test_train_speed_rejects_bad_flags():
  train_speed = benchmark_scripts.load('train_speed')
  with pytest.raises(SystemExit, match='length 100 must be a positive multip'):
    train_speed.main(['--models', 'original', '--seq_len', '100'])
  with pytest.raises(SystemExit, match='length 1000 must be .* multiple of 3'):
    train_speed.main(['--seq_lens', '768,1000'])
  with pytest.raises(SystemExit, match="--seq_lens '768,x' is not"):
    train_speed.main(['--seq_lens', '768,x'])
  with pytest.raises(SystemExit, match='not both'):
    train_speed.main(['--seq_len', '768', '--seq_lens', '768'])
  with pytest.raises(SystemExit, match='--tokens_per_step 0 must be >= 1'):
    train_speed.main(['--tokens_per_step', '0'])
  with pytest.raises(SystemExit, match='--max_rss_gib -1.0 must be >= 0'):
    train_speed.main(['--max_rss_gib', '-1'])
  with pytest.raises(SystemExit, match='warmup'):
    train_speed.main(['--quick', '--warmup', '0'])
  with pytest.raises(SystemExit, match='Unknown'):
    train_speed.main(['--models', 'gpt2'])
  assert train_speed.parse_lengths('1536, 768,768') == (768, 1536)
  cfg = dict(batch=None, tokens_per_step=6144)
  assert [train_speed.batch_for(cfg, n) for n in (768, 6144, 12288)] == [
      8, 1, 1]
  assert train_speed.batch_for(dict(cfg, batch=3), 12288) == 3


@pytest.mark.slow  # test_max_length_search checks the search; this the script.
def test_max_length_quick(tmp_path):
  json_path = tmp_path / 'max_length.json'
  # One length (the cap) keeps it to one worker; the search is tested below.
  result = subprocess.run(
      [sys.executable, MAX_LENGTH, '--quick', '--models', 'ours',
       '--max_seq_len', '48', '--json', str(json_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details
  row = _header_rows(result.stdout)['ours',]
  assert row['longest length trained'] == '48', details
  assert row['why'].startswith('cap'), details
  assert _number(row['its peak RSS MiB']) > 0, details
  report = json.loads(json_path.read_text())
  ours = report['results']['ours']
  fitted = [n for n, ok, _ in ours['tried'] if ok]
  assert ours['longest'] == max(fitted) == 48
  assert (tmp_path / 'max_length.png').read_bytes()[:4] == b'\x89PNG'


def test_max_length_search():
  max_length = benchmark_scripts.load('max_length')

  def search(limit, max_len=98304, bisect_steps=2, start=768):
    fits = lambda n: (n <= limit, {'length': n})
    return max_length.search_max_length(fits, start, max_len, 768,
                                        bisect_steps)

  r = search(5000)  # Doubling fails at 6144; bisection: 4608 fits, 5376 not.
  assert [(n, ok) for n, ok, _ in r['tried']] == [
      (768, True), (1536, True), (3072, True), (6144, False), (4608, True),
      (5376, False)]
  assert (r['longest'], r['first_failure']) == (4608, 5376)
  assert r['longest_info'] == {'length': 4608}
  assert r['failure_info'] == {'length': 5376}
  r = search(5000, bisect_steps=10)  # Stops when no multiple is left between.
  assert (r['longest'], r['first_failure'], len(r['tried'])) == (4608, 5376, 6)
  r = search(5000, bisect_steps=0)
  assert (r['longest'], r['first_failure']) == (3072, 6144)
  r = search(10 ** 9)  # Everything fits: stops at the cap.
  assert [n for n, _, _ in r['tried']] == [768 * 2 ** i for i in range(8)]
  assert (r['longest'], r['first_failure']) == (98304, None)
  r = search(10 ** 9, max_len=2304)  # A cap between doublings is tried too.
  assert [n for n, _, _ in r['tried']] == [768, 1536, 2304]
  r = search(100)  # Not even the start fits.
  assert (r['longest'], r['first_failure'], len(r['tried'])) == (None, 768, 1)


def test_max_length_rejects_bad_flags():
  max_length = benchmark_scripts.load('max_length')
  with pytest.raises(SystemExit, match='length 100 must be .* multiple of 3'):
    max_length.main(['--granularity', '100'])
  with pytest.raises(SystemExit, match='--max_seq_len 1000 must be a positive'):
    max_length.main(['--max_seq_len', '1000'])
  with pytest.raises(SystemExit, match='--max_seq_len 768 must be >= --start'):
    max_length.main(['--start', '1536', '--max_seq_len', '768'])
  with pytest.raises(SystemExit, match='--max_rss_gib 0.0 must be > 0'):
    max_length.main(['--max_rss_gib', '0'])
  with pytest.raises(SystemExit, match='Unknown'):
    max_length.main(['--models', 'gpt2'])


def test_run_worker_memory_guard():
  common = benchmark_scripts.harness()
  hog = ('import time; x = bytearray(b"x") * (300 << 20); '
         'print("allocated", flush=True); time.sleep(60)')
  proc = common.run_worker([sys.executable, '-c', hog], timeout_s=120,
                           max_rss_mib=100)
  assert proc['over_memory'] and not proc['timed_out'], proc
  assert proc['wall_s'] < 30 and proc['returncode'] != 0, proc
  assert proc['peak_rss_mib'] > 100, proc
  assert common.worker_failure_status(proc)[0] == 'over memory'
  small = common.run_worker([sys.executable, '-c', 'print("hi")'],
                            timeout_s=120, max_rss_mib=100)
  assert not small['over_memory'] and small['returncode'] == 0, small
  assert small['stdout'].strip() == 'hi'
  slow = common.run_worker(
      [sys.executable, '-c', 'import time; time.sleep(60)'], timeout_s=0.5)
  assert slow['timed_out'] and not slow['over_memory'], slow
  assert common.worker_failure_status(slow)[0] == 'timeout'


def test_train_step_flops_matches_hand_count():
  # TransformerLM: 6 x (matmul weights) x tokens + 3 x the attention matmuls'
  # 4 B L^2 d per layer (forward + 2x for backward); XLA also counts
  # elementwise ops, a few % at these sizes.
  common = benchmark_scripts.harness()
  trax = common.import_trax('transformer6')
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  vocab, d, d_ff, n_layers, batch, length = 256, 128, 512, 2, 2, 128
  model = trax.models.TransformerLM(vocab, d_model=d, d_ff=d_ff, n_heads=4,
                                    n_layers=n_layers, max_len=length,
                                    mode='train')
  tokens = np.ones((batch, length), np.int32)
  model.init(shapes.signature(tokens))
  flops = common.train_step_flops(
      model, (tokens, tokens, np.ones((batch, length), np.float32)))
  matmul_weights = n_layers * (4 * d * d + 2 * d * d_ff) + d * vocab
  hand = (6 * matmul_weights * batch * length
          + 3 * n_layers * 4 * batch * length ** 2 * d)
  assert flops == pytest.approx(hand, rel=0.2)
  assert flops > hand  # Elementwise ops come on top.


@pytest.mark.slow  # 3 workers; the script's counting and trace reading below.
def test_sample_speed_quick(tmp_path):
  # Both decoding paths and a baseline (each worker costs ~10 s of imports).
  models = ['ours', 'ours_sample', 'original']
  json_path = tmp_path / 'sample_speed.json'
  result = subprocess.run(
      [sys.executable, SAMPLE_SPEED, '--quick', '--models', ','.join(models),
       '--repeats', '2', '--profile', '3', '--json', str(json_path)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
  details = f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'
  assert result.returncode == 0, details

  rows = benchmark_scripts.table_rows(result.stdout, 'model')
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
  # Our loop's time is the median of the timed calls.
  calls = runs['ours_sample']['calls_s']
  assert len(calls) == 2 and runs['ours_sample']['timed_s'] in calls
  # --profile traced one more call of our loop only.
  profile = runs['ours_sample']['profile']
  assert profile['ops_per_token'] > 10 and len(profile['top']) == 3
  assert 0 < profile['busy_ms_per_token'] < profile['wall_ms_per_token']
  assert 'ours_sample, one traced call, per token' in result.stdout
  assert 'profile' not in runs['ours']
  # The first call, compilation inside: slower than the timed tokens alone.
  assert 'first call tokens/s' in header and 'compile s' in header
  for model in ('ours', 'ours_sample'):
    assert 0 < runs[model]['first_call_tokens_per_s'] < runs[model][
        'tokens_per_s']
  assert 'first_call_tokens_per_s' not in runs['original']


def test_sample_speed_rejects_bad_flags():
  sample_speed = benchmark_scripts.load('sample_speed')
  with pytest.raises(SystemExit, match='max_len'):
    sample_speed.main(['--n_tokens', '100', '--max_len', '50'])
  with pytest.raises(SystemExit, match='warmup'):
    sample_speed.main(['--quick', '--warmup', '0'])
  with pytest.raises(SystemExit, match='repeats'):
    sample_speed.main(['--quick', '--repeats', '0'])
  with pytest.raises(SystemExit, match='Unknown'):
    sample_speed.main(['--models', 'gpt2'])


def _write_trace(path, processes, events):
  """A perfetto trace as jax.profiler writes it: {pid: (name, {tid: name})}
  and complete events (pid, tid, name, start µs, duration µs)."""
  import gzip  # pylint: disable=g-import-not-at-top
  meta = []
  for pid, (name, threads) in processes.items():
    meta.append(dict(ph='M', name='process_name', pid=pid,
                     args=dict(name=name)))
    meta += [dict(ph='M', name='thread_name', pid=pid, tid=tid,
                  args=dict(name=t)) for tid, t in threads.items()]
  path.mkdir(parents=True)
  with gzip.open(path / 'perfetto_trace.json.gz', 'wt') as f:
    json.dump(dict(traceEvents=meta + [
        dict(ph='X', pid=p, tid=t, name=n, ts=ts, dur=d)
        for p, t, n, ts, d in events]), f)


def test_sample_speed_reads_device_operations_from_a_trace(tmp_path):
  device_ops = benchmark_scripts.load('sample_speed').device_ops
  # The CPU: innermost operations of XLA's threads, not its runtime's
  # functions, the 'end:' marks inside operations, or Python's frames.
  cpu = {1: ('/host:CPU', {10: 'tf_XLAEigen/1', 11: 'python'})}
  _write_trace(tmp_path / 'cpu' / 'plugins' / 'profile' / 'run', cpu, [
      (1, 10, 'ThunkExecutor::Execute', 0, 100),
      (1, 10, 'while.3', 1, 90),
      (1, 10, 'dot.1', 2, 10), (1, 10, 'end: dot.1', 11, 1),
      (1, 10, 'cond.2', 20, 30), (1, 10, 'copy.4', 21, 5),
      (1, 10, 'fusion.7', 30, 4), (1, 10, 'end: fusion.7', 33, 1),
      (1, 11, '$decoding.py:180 sample', 0, 200)])
  assert sorted(device_ops(str(tmp_path / 'cpu'))) == [
      ('copy.4', 21, 5), ('dot.1', 2, 10), ('fusion.7', 30, 4)]
  # A GPU: kernels on its streams, not the host's events or the 'XLA Ops'
  # line derived from the same kernels.
  gpu = {1: ('/host:CPU', {10: 'tf_XLAEigen/1'}),
         2: ('/device:GPU:0', {1: 'Stream #13(Compute)', 2: 'XLA Ops'})}
  _write_trace(tmp_path / 'gpu', gpu, [
      (1, 10, 'fusion.9', 0, 50),
      (2, 1, 'loop_add_fusion', 5, 2), (2, 1, 'gemm_kernel', 8, 3),
      (2, 2, 'add.1', 5, 2), (2, 2, 'dot.2', 8, 3)])
  assert sorted(device_ops(str(tmp_path / 'gpu'))) == [
      ('gemm_kernel', 8, 3), ('loop_add_fusion', 5, 2)]


@pytest.mark.parametrize('ff_sparsity', [  # The dense count: -m slow.
    pytest.param(0, marks=pytest.mark.slow), 4])
def test_sample_speed_counts_the_weights_a_token_reads(ff_sparsity):
  # Two more shortened layers (factor 3) are read once every 3 tokens, each
  # but the 3/4 of its feed-forward kernels a sparse FF does not choose.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  import trax_hourglass as th  # pylint: disable=g-import-not-at-top
  sample_speed = benchmark_scripts.load('sample_speed')
  read, n_params = [], []
  for hierarchy in ('1@1 2@3 1@1', '1@1 4@3 1@1'):
    model = th.HourglassLM(11, d_model=16, d_ff=32, n_heads=2, dropout=0.0,
                           hierarchy=hierarchy, ff_sparsity=ff_sparsity,
                           mode='predict', max_len=6)
    model.init(shapes.ShapeDtype((1, 1), np.int32))
    read.append(sample_speed.weight_bytes_per_token(model))
    n_params.append(sum(w.size for w in jax.tree_util.tree_leaves(
        model.weights)))
  unchosen = 2 * 16 * 32 * 3 / 4 if ff_sparsity else 0  # Per layer.
  assert read[1] - read[0] == pytest.approx(
      4 * (n_params[1] - n_params[0] - 2 * unchosen) / 3)


def test_common_helpers():
  common = benchmark_scripts.harness()
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


def _root_name(node):
  """'a' of an expression a.b.c (None if it does not start with a name)."""
  while isinstance(node, ast.Attribute):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def test_no_benchmark_replaces_attributes_of_what_it_imports():
  # Benchmarks reach the package through its arguments and options, never by
  # assigning to (monkeypatching) a module or class they import.
  paths = glob.glob(os.path.join(benchmark_scripts.BENCHMARKS, '**', '*.py'),
                    recursive=True)
  assert len(paths) > 10
  patches = []
  for path in paths:
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    imported = {(a.asname or a.name).split('.')[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in node.names}
    for node in ast.walk(tree):
      if isinstance(node, ast.Assign):
        targets = node.targets
      elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
      else:
        continue
      patches += [f'{path}:{node.lineno}' for t in targets
                  if isinstance(t, ast.Attribute)
                  and _root_name(t) in imported]
  assert not patches


RUN_SH = f'{REPO_ROOT}/benchmarks/device/run.sh'


def _run_sh(tmp_path, *args, timeout=120):
  result = subprocess.run(['bash', RUN_SH, str(tmp_path / 'out'), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env=dict(os.environ,
                                   PYTHON=sys.executable))
  return result, f'stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}'


def test_device_script_knows_its_steps_and_its_time(tmp_path):
  result, details = _run_sh(tmp_path, 'training_paper', 'sampling_nope')
  assert result.returncode == 2, details
  assert "unknown step 'sampling_nope'" in result.stderr
  assert 'training_paper_bf16' in result.stderr  # The steps it knows.
  # No time left: every step is skipped, the machine is still described.
  result, details = _run_sh(tmp_path, '--seconds', '0', '--quick')
  assert result.returncode == 0, details
  for step in ('training_paper', 'training_paper_bf16', 'sampling_paper',
               'sampling_paper_batch', 'sampling_paper_bf16'):
    assert f'== {step}: skipped' in result.stdout, details
  assert (tmp_path / 'out' / 'machine.txt').read_text().startswith('python ')


@pytest.mark.slow
def test_device_script_dry_run_on_the_cpu(tmp_path):
  # Every step, --quick (tiny models): what a device run does, on the CPU.
  result, details = _run_sh(tmp_path, '--quick', '--seconds', '1500',
                            timeout=1600)
  assert result.returncode == 0, details
  assert 'exit status' not in result.stdout and 'skipped' not in result.stdout, (
      details)
  for step in ('training_reference', 'training_paper', 'training_paper_bf16',
               'sampling_profile', 'sampling_reference', 'sampling_batch',
               'sampling_paper', 'sampling_paper_batch', 'sampling_paper_bf16',
               'sampling_sparse', 'sampling_long'):
    report = json.loads((tmp_path / 'out' / f'{step}.json').read_text())
    assert report['summary'], step
  bf16 = json.loads((tmp_path / 'out' / 'sampling_paper_bf16.json').read_text())
  assert bf16['config']['dtype'] == 'bfloat16'
