"""Sampling speed (new tokens/s) of Hourglass vs. the original and a Transformer.

Measures how fast each model generates tokens one after another (batch 1,
temperature 1, random weights: only speed matters):

  ours           trax_hourglass.HourglassLM(mode='predict'), sampled with
                 trax's `decoding.autoregressive_sample_stream` (one jitted
                 model call per token, sampling on the host)
  ours_sample    the same model sampled with `trax_hourglass.decoding.sample`
                 (model step and sampling fused, many tokens per call)
  original       trax.models.research.hourglass.HourglassLM in 'eval' mode, as
                 trax's Hourglass sampling notebook does it: one full forward
                 pass per token over a fixed buffer of `--n_tokens` (rounded
                 up to the shorten factor), jitted once; its cost does not
                 depend on the position, so `--original_tokens` are timed
  transformer12  trax.models.TransformerLM(mode='predict'), 12 layers, same
                 d_model/d_ff/n_heads, with autoregressive_sample_stream
  transformer12_sample  the same, sampled with `trax_hourglass.decoding.sample`
                 (same decoding loop as ours_sample: compares architectures)

Reference configuration (the defaults): vocab 256, hierarchy '2@1 8@3 2@1'
(vanilla_layers (2, 2), '8@3'), d_model 256, d_ff 1024, n_heads 4, batch 1,
1024 new tokens, max_len 2048 (the cache length of ours and the positional
length of the Transformer).

Timing excludes compilation: for the streams, the first `--warmup` tokens
(2: the first call compiles, and the second is slow too, as jit sees the
model's new state as committed arrays; see train_speed.py); for the
`*_sample` rows, an untimed first call of 2 tokens compiles and a second call
generating all `--n_tokens` is timed; for `original`, one untimed forward
pass. As in train_speed.py, every (model, round) runs in a fresh process,
rounds rotate the order, and the table reports medians, min/max and ratios of
medians to `original`, `transformer12` and `transformer12_sample`.

Reproduce (from the repository root):

  /work/venv/bin/python benchmarks/sample_speed.py --rounds 3 \
      --json /tmp/sample_speed.json

Quick smoke run (tiny sizes, 1 round, XLA optimization off; its numbers mean
nothing; used by tests/test_benchmarks.py):

  /work/venv/bin/python benchmarks/sample_speed.py --quick
"""

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = ('ours', 'ours_sample', 'original', 'transformer12',
          'transformer12_sample')
BASELINES = ('original', 'transformer12', 'transformer12_sample')
# Printed below the table: each Hourglass row against each baseline decoded
# the same way or against the original.
RATIOS = (('ours', 'original'), ('ours', 'transformer12'),
          ('ours_sample', 'original'), ('ours_sample', 'transformer12'),
          ('ours_sample', 'transformer12_sample'))

REFERENCE = dict(vocab_size=256, d_model=256, d_ff=1024, n_heads=4,
                 vanilla_layers=(2, 2), hierarchy='8@3', dropout=0.0,
                 n_tokens=1024, original_tokens=32, max_len=2048, warmup=2,
                 temperature=1.0, rounds=3, fast_compile=False)
QUICK = dict(REFERENCE, d_model=32, d_ff=64, n_heads=2, vanilla_layers=(1, 1),
             hierarchy='1@3', n_tokens=24, original_tokens=4, max_len=48,
             rounds=1, fast_compile=True)
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',)


def _buffer_len(cfg):
  """The original's fixed buffer: n_tokens rounded up to its shorten factor."""
  factor = _common.max_shorten_factor(cfg['hierarchy']) or 1
  return -(-cfg['n_tokens'] // factor) * factor


def _time_stream(model, cfg):
  """Times autoregressive_sample_stream after `warmup` (compiling) tokens."""
  from trax.supervised import decoding  # pylint: disable=g-import-not-at-top
  stream = decoding.autoregressive_sample_stream(
      model, batch_size=1, temperature=cfg['temperature'])
  first_ms = []
  for _ in range(cfg['warmup']):
    start = time.perf_counter()
    next(stream)  # A numpy array: the token is computed.
    first_ms.append(1000. * (time.perf_counter() - start))
  n = cfg['n_tokens'] - cfg['warmup']
  start = time.perf_counter()
  for _ in range(n):
    next(stream)
  return n, time.perf_counter() - start, dict(first_tokens_ms=first_ms)


def _time_sample(model, cfg):
  """Times trax_hourglass.decoding.sample after a compiling call."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  decoding.sample(model, 2, temperature=cfg['temperature'], seed=1)
  compile_ms = 1000. * (time.perf_counter() - start)
  start = time.perf_counter()
  tokens = decoding.sample(model, cfg['n_tokens'],
                           temperature=cfg['temperature'])
  elapsed = time.perf_counter() - start
  assert tokens.shape == (1, cfg['n_tokens']), tokens.shape
  return cfg['n_tokens'], elapsed, dict(first_tokens_ms=[compile_ms])


def _time_original(trax, model, cfg):
  """One jitted eval forward pass over the whole buffer per new token."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fwd = trax.fastmath.jit(lambda x, w, s, r: model.pure_fn(x, w, s, r)[0])
  weights, state = model.weights, model.state
  rng = trax.fastmath.random.get_prng(_common.SEED)
  sampler = np.random.default_rng(_common.SEED)
  buffer = np.zeros((1, _buffer_len(cfg)), np.int32)

  def next_token(t):
    # Logits at t predict token t (the model shifts its input right).
    logits = np.asarray(fwd(buffer, weights, state, rng))[0, t]
    p = np.exp((logits - logits.max()) / cfg['temperature'])
    buffer[0, t] = sampler.choice(len(p), p=p / p.sum())

  start = time.perf_counter()
  next_token(0)
  first_ms = [1000. * (time.perf_counter() - start)]
  n = cfg['original_tokens']
  start = time.perf_counter()
  for t in range(1, n + 1):
    next_token(t)
  return n, time.perf_counter() - start, dict(first_tokens_ms=first_ms,
                                              buffer_len=buffer.shape[1])


def _worker(model_name, cfg):
  """Measures one model in this (fresh) process; prints one result line."""
  record = dict(model=model_name, status='ok', pid=os.getpid())
  base_name = model_name[:-len('_sample')] if model_name.endswith(
      '_sample') else model_name
  trax = _common.worker_import_trax(base_name, record)
  if trax is None:
    return 0

  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    np.random.seed(_common.SEED)
    mode = 'eval' if model_name == 'original' else 'predict'
    start = time.perf_counter()
    model = _common.make_model(base_name, dict(cfg, seq_len=_buffer_len(cfg)),
                               mode=mode)
    length = _buffer_len(cfg) if mode == 'eval' else 1
    model.init(trax.shapes.ShapeDtype((1, length), np.int32))
    _common.block(model.weights)
    record['init_s'] = time.perf_counter() - start
    record['n_params'] = _common.count_params(model.weights)
    if model_name == 'original':
      n, elapsed, extra = _time_original(trax, model, cfg)
    elif model_name.endswith('_sample'):
      n, elapsed, extra = _time_sample(model, cfg)
    else:
      n, elapsed, extra = _time_stream(model, cfg)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    record.update(status='error', reason=f'{type(e).__name__}: {e}')
    _common.emit_result(record)
    return 1

  record.update(extra, timed_s=elapsed, timed_tokens=n,
                tokens_per_s=n / elapsed, ms_per_token=1000. * elapsed / n,
                self_peak_rss_mib=_common.self_peak_rss_mib(),
                **_common.device_summary())
  _common.emit_result(record)
  return 0


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(MODELS),
                      help='Comma-separated subset of %(default)s.')
  parser.add_argument('--quick', action='store_true',
                      help='Smoke test: tiny sizes, 1 round, XLA optimization '
                      'off; explicit flags below still override.')
  for name, type_ in [('d_model', int), ('d_ff', int), ('n_heads', int),
                      ('hierarchy', str),
                      ('vanilla_layers', _common.parse_int_tuple),
                      ('n_tokens', int), ('original_tokens', int),
                      ('max_len', int), ('warmup', int),
                      ('temperature', float), ('rounds', int)]:
    parser.add_argument(f'--{name}', type=type_, default=None,
                        help=f'Default {REFERENCE[name]!r} '
                        f'({QUICK[name]!r} with --quick).')
  parser.add_argument('--json', metavar='PATH',
                      help='Also write config, every run and the summary here.')
  parser.add_argument('--worker_timeout', type=float, default=None,
                      help='Seconds before a worker is killed '
                      '(default 1800, 600 with --quick).')
  parser.add_argument('--_worker', metavar='MODEL', help=argparse.SUPPRESS)
  parser.add_argument('--_config', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _resolve_config(args):
  cfg = _common.config_from_args(args, REFERENCE, QUICK)
  if cfg['warmup'] < 1 or cfg['n_tokens'] <= cfg['warmup']:
    raise SystemExit(f'--warmup must be >= 1 (the first token compiles) and '
                     f'below --n_tokens; got warmup {cfg["warmup"]}, n_tokens '
                     f'{cfg["n_tokens"]}.')
  if cfg['max_len'] < cfg['n_tokens']:
    raise SystemExit(f'--max_len {cfg["max_len"]} must be >= --n_tokens '
                     f'{cfg["n_tokens"]}.')
  if not 1 <= cfg['original_tokens'] < _buffer_len(cfg):
    raise SystemExit(f'--original_tokens must be in 1..'
                     f'{_buffer_len(cfg) - 1}, got {cfg["original_tokens"]}.')
  if cfg['rounds'] < 1 or cfg['temperature'] <= 0:
    raise SystemExit('--rounds must be >= 1 and --temperature > 0.')
  return cfg


def _summarize(models, runs):
  """Per-model medians over successful rounds, and ratios to the baselines."""
  summary = {}
  for m in models:
    ok = [r for r in runs if r['model'] == m and r['status'] == 'ok']
    tps = [r['tokens_per_s'] for r in ok]
    summary[m] = dict(
        n_runs=len(ok),
        tokens_per_s_median=_common.median(tps),
        tokens_per_s_min=min(tps) if tps else None,
        tokens_per_s_max=max(tps) if tps else None,
        ms_per_token_median=_common.median([r['ms_per_token'] for r in ok]),
        compile_s_median=_common.median(
            [sum(r['first_tokens_ms']) / 1000. for r in ok]),
        peak_rss_mib_max=max((r['peak_rss_mib'] for r in ok), default=None),
        n_params=ok[0]['n_params'] if ok else None)
  for m, s in summary.items():
    for base in BASELINES:
      b = summary.get(base, {}).get('tokens_per_s_median')
      mine = s['tokens_per_s_median']
      s[f'ratio_vs_{base}'] = mine / b if mine and b else None
  return summary


def _table(models, summary):
  headers = ['model', 'params', 'tokens/s (median)', 'min', 'max',
             'vs original', 'vs transformer12', 'vs transformer12_sample',
             'ms/token', 'peak RSS MiB', 'warmup s', 'runs']
  rows = []
  for m in models:
    s = summary[m]
    rows.append([
        m, _common.fmt(s['n_params'], ','),
        _common.fmt(s['tokens_per_s_median'], ',.1f'),
        _common.fmt(s['tokens_per_s_min'], ',.1f'),
        _common.fmt(s['tokens_per_s_max'], ',.1f'),
        _common.fmt(s['ratio_vs_original'], '.2f', suffix='x'),
        _common.fmt(s['ratio_vs_transformer12'], '.2f', suffix='x'),
        _common.fmt(s['ratio_vs_transformer12_sample'], '.2f', suffix='x'),
        _common.fmt(s['ms_per_token_median'], ',.2f'),
        _common.fmt(s['peak_rss_mib_max'], ',.0f'),
        _common.fmt(s['compile_s_median'], '.1f'),
        s['n_runs']])
  return _common.markdown_table(headers, rows)


def _parent(args):
  models = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = sorted(set(models) - set(MODELS))
  if unknown or not models:
    raise SystemExit(f'Unknown --models {unknown}; choose from '
                     f'{",".join(MODELS)}.')
  cfg = _resolve_config(args)
  timeout_s = args.worker_timeout or (600 if args.quick else 1800)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  runs, skipped, failed = [], {}, {}
  for rnd in range(cfg['rounds']):
    order = models[rnd % len(models):] + models[:rnd % len(models)]
    for m in order:
      if m in skipped or m in failed:
        continue
      argv = [sys.executable, os.path.abspath(__file__), '--_worker', m,
              '--_config', json.dumps(cfg)]
      proc = _common.run_worker(
          argv, timeout_s,
          xla_flags=FAST_COMPILE_XLA_FLAGS if cfg['fast_compile'] else ())
      record = _common.parse_result(proc['stdout']) or dict(
          model=m, status='error',
          reason='timed out' if proc['timed_out'] else
          f'worker exited {proc["returncode"]} without a result')
      record.update(round=rnd, peak_rss_mib=proc['peak_rss_mib'],
                    worker_wall_s=proc['wall_s'],
                    returncode=proc['returncode'])
      runs.append(record)
      prefix = f'[round {rnd + 1}/{cfg["rounds"]}] {m}:'
      if record['status'] == 'ok':
        log(f'{prefix} {record["tokens_per_s"]:,.1f} tokens/s '
            f'({record["timed_tokens"]} timed), first tokens '
            f'{", ".join(f"{x:,.0f}" for x in record["first_tokens_ms"])} ms, '
            f'peak RSS {record["peak_rss_mib"]:,.0f} MiB, process '
            f'{proc["wall_s"]:.1f} s')
      elif record['status'] == 'unavailable':
        skipped[m] = record['reason']
        log(f'{prefix} SKIPPED: {record["reason"]}')
      else:
        failed[m] = record['reason']
        log(f'{prefix} FAILED: {record["reason"]}\n'
            f'{_common.tail(proc["stderr"])}')

  summary = _summarize(models, runs)
  ran = [m for m in models if m not in skipped]
  print(f'Sampling speed, batch 1, {cfg["n_tokens"]} new tokens (original: '
        f'{cfg["original_tokens"]} tokens over a {_buffer_len(cfg)}-token '
        f'buffer), d_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, n_heads '
        f'{cfg["n_heads"]}, vanilla_layers {tuple(cfg["vanilla_layers"])}, '
        f'hierarchy {cfg["hierarchy"]!r}, max_len {cfg["max_len"]}, '
        f'{cfg["rounds"]} rounds'
        + (f', on {runs[0]["backend"]} ({runs[0]["device_kind"]})'
           if runs and 'backend' in runs[0] else '')
        + (' [--quick: XLA optimization off, smoke test only, not a '
           'measurement]' if cfg['fast_compile'] else '') + ':\n')
  print(_table(ran, summary))
  ratios = [f'{m} / {base}: {summary[m][f"ratio_vs_{base}"]:.2f}x'
            for m, base in RATIOS
            if m in ran and summary[m][f'ratio_vs_{base}'] is not None]
  if ratios:
    print('\n' + '\n'.join(ratios))
  for m, reason in skipped.items():
    print(f'\n{m}: skipped, {reason}')
  for m, reason in failed.items():
    print(f'\n{m}: FAILED, {reason}')

  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(benchmark='sample_speed', config=cfg, models=models,
                     summary=summary, runs=runs, skipped=skipped, failed=failed),
                f, indent=2, sort_keys=True)
  return 1 if failed or not any(r['status'] == 'ok' for r in runs) else 0


def main(argv=None):
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  if args._worker:  # pylint: disable=protected-access
    return _worker(args._worker, json.loads(args._config))  # pylint: disable=protected-access
  return _parent(args)


if __name__ == '__main__':
  sys.exit(main())
