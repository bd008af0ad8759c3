"""Training throughput (tokens/s) of Hourglass vs. the original and Transformers.

Measures how many tokens per second a real `trax.supervised.training.Loop`
trains on (forward + backward + Adam update, dropout on, mode='train') for:

  ours           trax_hourglass.HourglassLM (this repository)
  original       trax.models.research.hourglass.HourglassLM (trax 1.4.1)
  transformer6   trax.models.TransformerLM, same d_model/d_ff/n_heads, 6 layers
  transformer12  trax.models.TransformerLM, same d_model/d_ff/n_heads, 12 layers

Reference configuration (the defaults): vocab 256, vanilla_layers=(2, 2),
hierarchy='8@3' (i.e. 2@1 8@3 2@1), d_model 256, d_ff 1024, n_heads 4,
dropout 0.1, sequence length 768, batch 8, Adam with constant lr 1e-4,
`tl.WeightedCategoryCrossEntropy`, random tokens from an in-memory stream.

Every (model, round) runs in a fresh Python process, so no two trax training
loops ever share a process (JIT caches, allocator and trax globals would skew
the numbers). Each worker imports trax the same way (through `trax_hourglass`'s
`compat`), builds the Loop (n_devices=1, no eval, no checkpoints), runs
`--warmup` untimed steps (>= 2: trax compiles the training step on steps 1
and 2, see `_resolve_config`), then times `loop.run(--steps)` until the new
weights are actually computed. Rounds
alternate the models (rotating their order) so that slow drifts of a shared
machine hit all of them alike; the table reports the median over rounds,
min/max, ratios of medians to `original` and `transformer6`, and each worker
process's peak RSS.

Reproduce (from the repository root):

  /work/venv/bin/python benchmarks/train_speed.py --rounds 3 --steps 10 \
      --json /tmp/train_speed.json

On a 2-core CPU that takes about an hour: each worker spends 1-4 minutes
compiling and a reference step takes 10-15 s. Progress goes to stderr, the
table to stdout.

Quick smoke run (tiny sizes, 1 round, 2 steps, XLA optimization off so it
compiles fast; its numbers mean nothing; used by tests/test_benchmarks.py):

  /work/venv/bin/python benchmarks/train_speed.py --quick \
      --models original,transformer6
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

# Sizes: the paper-style reference, and a tiny one that compiles in seconds.
REFERENCE = dict(vocab_size=256, seq_len=768, batch=8, d_model=256, d_ff=1024,
                 n_heads=4, vanilla_layers=(2, 2), hierarchy='8@3',
                 dropout=0.1, learning_rate=1e-4,
                 steps=10, warmup=2, rounds=3, fast_compile=False)
# fast_compile: XLA backend optimization level 0 halves compile time, which
# dominates a smoke run; its tokens/s are then not a measurement.
QUICK = dict(REFERENCE, seq_len=48, batch=2, d_model=32, d_ff=64, n_heads=2,
             vanilla_layers=(1, 1), hierarchy='1@3',
             steps=2, warmup=2, rounds=1, fast_compile=True)
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',)


def _never(step):
  del step
  return False


def _worker(model_name, cfg):
  """Measures one model in this (fresh) process; prints one result line."""
  record = dict(model=model_name, status='ok', pid=os.getpid())
  start = time.perf_counter()
  try:
    trax = _common.import_trax(model_name)
  except _common.ModelUnavailable as e:
    record.update(status='unavailable', reason=str(e))
    _common.emit_result(record)
    return 0
  record['import_s'] = time.perf_counter() - start

  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from trax import layers as tl  # pylint: disable=g-import-not-at-top
    from trax.supervised import training  # pylint: disable=g-import-not-at-top
    np.random.seed(_common.SEED)

    start = time.perf_counter()
    model = _common.make_model(model_name, cfg, mode='train')
    task = training.TrainTask(
        labeled_data=_common.random_lm_batches(
            cfg['vocab_size'], cfg['batch'], cfg['seq_len']),
        loss_layer=tl.WeightedCategoryCrossEntropy(),
        optimizer=trax.optimizers.Adam(cfg['learning_rate']),
        lr_schedule=trax.lr.constant(cfg['learning_rate']))
    with tempfile.TemporaryDirectory() as output_dir:
      loop = training.Loop(model, [task], output_dir=output_dir,
                           checkpoint_at=_never, permanent_checkpoint_at=_never,
                           n_devices=1, random_seed=_common.SEED)
      _common.block(loop.model.weights)
      record['init_s'] = time.perf_counter() - start
      record['n_params'] = _common.count_params(loop.model.weights)

      # Untimed: compilation (twice, see `_resolve_config`) and first steps.
      start = time.perf_counter()
      loop.run(cfg['warmup'])
      _common.block((loop.model.weights, loop.model.state))
      record['warmup_s'] = time.perf_counter() - start

      # Timed: JAX dispatches asynchronously, so stop the clock only once the
      # last step's weights exist (they depend on every earlier step).
      start = time.perf_counter()
      loop.run(cfg['steps'])
      _common.block((loop.model.weights, loop.model.state))
      elapsed = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    record.update(status='error', reason=f'{type(e).__name__}: {e}')
    _common.emit_result(record)
    return 1

  tokens = cfg['steps'] * cfg['batch'] * cfg['seq_len']
  record.update(timed_s=elapsed, steps=cfg['steps'],
                tokens_per_s=tokens / elapsed,
                step_ms=1000. * elapsed / cfg['steps'],
                self_peak_rss_mib=_common.self_peak_rss_mib(),
                **_common.device_summary())
  _common.emit_result(record)
  return 0


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(_common.ALL_MODELS),
                      help='Comma-separated subset of %(default)s.')
  parser.add_argument('--quick', action='store_true',
                      help='Smoke test: tiny sizes, 1 round, 2 steps, XLA '
                      'optimization off; explicit flags below still override.')
  # None = "take it from the reference (or --quick) configuration".
  for name, type_ in [('seq_len', int), ('batch', int), ('d_model', int),
                      ('d_ff', int), ('n_heads', int), ('hierarchy', str),
                      ('vanilla_layers', _common.parse_int_tuple),
                      ('dropout', float), ('learning_rate', float),
                      ('steps', int), ('warmup', int), ('rounds', int)]:
    parser.add_argument(f'--{name}', type=type_, default=None,
                        help=f'Default {REFERENCE[name]!r} '
                        f'({QUICK[name]!r} with --quick).')
  parser.add_argument('--json', metavar='PATH',
                      help='Also write config, every run and the summary here.')
  parser.add_argument('--worker_timeout', type=float, default=None,
                      help='Seconds before a worker is killed '
                      '(default 3600, 600 with --quick).')
  # Internal: run one measurement in this process (spawned by the parent).
  parser.add_argument('--_worker', metavar='MODEL', help=argparse.SUPPRESS)
  parser.add_argument('--_config', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _resolve_config(args):
  cfg = dict(QUICK if args.quick else REFERENCE)
  for name in cfg:
    value = getattr(args, name, None)
    if value is not None:
      cfg[name] = value
  # Trax on jax 0.4.38 compiles the training step twice: step 1 gets freshly
  # initialized (uncommitted) arrays, step 2 the committed outputs of step 1,
  # and jit caches on that difference. Both compiles must stay untimed.
  if cfg['warmup'] < 2:
    raise SystemExit('--warmup must be >= 2: the 2nd training step recompiles.')
  if cfg['steps'] < 1 or cfg['rounds'] < 1:
    raise SystemExit('--steps and --rounds must be >= 1.')
  factor = _common.max_shorten_factor(cfg['hierarchy'])
  if factor and cfg['seq_len'] % factor:
    raise SystemExit(f'--seq_len {cfg["seq_len"]} must be divisible by the '
                     f'hierarchy\'s shortening factor {factor}.')
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
        step_ms_median=_common.median([r['step_ms'] for r in ok]),
        warmup_s_median=_common.median([r['warmup_s'] for r in ok]),
        peak_rss_mib_max=max((r['peak_rss_mib'] for r in ok), default=None),
        n_params=ok[0]['n_params'] if ok else None)
  for m, s in summary.items():
    for base in _common.BASELINES:
      b = summary.get(base, {}).get('tokens_per_s_median')
      mine = s['tokens_per_s_median']
      s[f'ratio_vs_{base}'] = mine / b if mine and b else None
  return summary


def _table(models, summary):
  headers = ['model', 'params', 'tokens/s (median)', 'min', 'max',
             'vs original', 'vs transformer6', 'ms/step', 'peak RSS MiB',
             'warmup s', 'runs']
  rows = []
  for m in models:
    s = summary[m]
    rows.append([
        m, _common.fmt(s['n_params'], ','),
        _common.fmt(s['tokens_per_s_median']),
        _common.fmt(s['tokens_per_s_min']),
        _common.fmt(s['tokens_per_s_max']),
        _common.fmt(s['ratio_vs_original'], '.2f', suffix='x'),
        _common.fmt(s['ratio_vs_transformer6'], '.2f', suffix='x'),
        _common.fmt(s['step_ms_median'], ',.1f'),
        _common.fmt(s['peak_rss_mib_max'], ',.0f'),
        _common.fmt(s['warmup_s_median'], '.1f'),
        s['n_runs']])
  return _common.markdown_table(headers, rows)


def _parent(args):
  models = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = sorted(set(models) - set(_common.ALL_MODELS))
  if unknown or not models:
    raise SystemExit(f'Unknown --models {unknown}; choose from '
                     f'{",".join(_common.ALL_MODELS)}.')
  cfg = _resolve_config(args)
  timeout_s = args.worker_timeout or (600 if args.quick else 3600)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  runs, skipped, failed = [], {}, {}
  for rnd in range(cfg['rounds']):
    # Rotate the order each round so no model always runs first / last.
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
        log(f'{prefix} {record["tokens_per_s"]:,.0f} tokens/s, '
            f'{record["step_ms"]:,.1f} ms/step, warmup '
            f'{record["warmup_s"]:.1f} s, peak RSS '
            f'{record["peak_rss_mib"]:,.0f} MiB, process '
            f'{proc["wall_s"]:.1f} s')
      elif record['status'] == 'unavailable':
        skipped[m] = record['reason']
        log(f'{prefix} SKIPPED: {record["reason"]}')
      else:
        failed[m] = record['reason']
        log(f'{prefix} FAILED: {record["reason"]}\n{_common.tail(proc["stderr"])}')

  summary = _summarize(models, runs)
  ran = [m for m in models if m not in skipped]
  print(f'Training throughput, {cfg["batch"]} x {cfg["seq_len"]} tokens/step, '
        f'd_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, n_heads '
        f'{cfg["n_heads"]}, vanilla_layers {tuple(cfg["vanilla_layers"])}, '
        f'hierarchy {cfg["hierarchy"]!r}, {cfg["steps"]} timed steps x '
        f'{cfg["rounds"]} rounds'
        + (f', on {runs[0]["backend"]} ({runs[0]["device_kind"]})'
           if runs and 'backend' in runs[0] else '')
        + (' [--quick: XLA optimization off, smoke test only, not a '
           'measurement]' if cfg['fast_compile'] else '') + ':\n')
  print(_table(ran, summary))
  for m, reason in skipped.items():
    print(f'\n{m}: skipped, {reason}')
  for m, reason in failed.items():
    print(f'\n{m}: FAILED, {reason}')

  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(benchmark='train_speed', config=cfg, models=models,
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
