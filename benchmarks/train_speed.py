"""Training throughput (tokens/s) of Hourglass vs. the original and Transformers.

Tokens per second of a real `trax.supervised.training.Loop` (forward, backward
and Adam update, dropout on) for the models of `harness.make_model`: ours, the
original (trax 1.4.1's), TransformerLM with 6 and 12 layers of the same width.

Reference configuration (the defaults): vocab 256, vanilla_layers (2, 2),
hierarchy '8@3', d_model 256, d_ff 1024, 4 heads, dropout 0.1, sequence
length 768, batch 8, Adam at a constant 1e-4, random tokens from memory.
`--seq_lens 768,1536,...` sweeps lengths at a fixed `--tokens_per_step`
(batch = max(1, tokens_per_step // length) unless `--batch` fixes it); lengths
must be divisible by the hierarchy's shortening (3). A model that goes over
`--max_rss_gib` of resident memory (killed at once), times out or fails at one
length skips the longer ones.

Each (model, length, round) runs in a fresh worker process: `--warmup` untimed
steps (the first compiles), then `loop.run(--steps)` timed until the weights
are computed. Rounds rotate the models' order; the table has medians, min/max,
ratios to `original` and `transformer6`, and each worker's peak RSS. GFLOP/s:
XLA's cost analysis of one lowered forward + backward step
(`harness.train_step_flops`) x steps / seconds; "% of matmul peak" divides it
by a float32 `--matmul_size`^2 matmul timed in its own worker before and after
the models (the larger of the two).

Reproduce (from the repository root; ~1 hour on a 2-core CPU, most of each
worker compiling):

  python benchmarks/train_speed.py --rounds 3 --steps 10 \
      --json /tmp/train_speed.json
  python benchmarks/train_speed.py --seq_lens 768,1536,3072,6144,12288 \
      --rounds 2 --steps 3 --json /tmp/train_speed_sweep.json

Quick smoke run (tiny sizes, XLA optimization off; numbers mean nothing):

  python benchmarks/train_speed.py --quick --models original,transformer6
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

# Sizes: the paper-style reference, and a tiny one that compiles in seconds.
# batch None: max(1, tokens_per_step // seq_len) at each length.
REFERENCE = dict(vocab_size=256, seq_lens=(768,), tokens_per_step=6144,
                 batch=None, d_model=256, d_ff=1024,
                 n_heads=4, vanilla_layers=(2, 2), hierarchy='8@3',
                 dropout=0.1, learning_rate=1e-4,
                 steps=10, warmup=2, rounds=3, fast_compile=False,
                 max_rss_gib=20., matmul_size=2048, count_flops=True,
                 dtype='float32', remat='none')
# fast_compile: `harness.workers.FAST_COMPILE_XLA_FLAGS`.
QUICK = dict(REFERENCE, seq_lens=(48,), tokens_per_step=96, d_model=32,
             d_ff=64, n_heads=2, vanilla_layers=(1, 1), hierarchy='1@3',
             steps=2, warmup=2, rounds=1, fast_compile=True, matmul_size=512)
# Statuses of a (model, length) that stop that model's sweep.
LIMIT_STATUSES = ('over memory', 'timeout', 'error')


def _worker(model_name, cfg):
  """Measures one model in this (fresh) process; prints one result line."""
  if model_name == 'matmul_peak':
    return harness.matmul_peak_worker(size=cfg['size'])
  return harness.work(functools.partial(harness.train_throughput, model_name, cfg), model_name,
                      model=model_name, seq_len=cfg['seq_len'],
                      batch=cfg['batch'])


def batch_for(cfg, seq_len):
  """The batch at `seq_len`: `cfg['batch']` if set, else tokens_per_step // seq_len."""
  return cfg['batch'] or max(1, cfg['tokens_per_step'] // seq_len)


def measure(model_name, cfg, seq_len, batch, timeout_s):
  """Trains `model_name` at (batch, seq_len) in a fresh worker; returns its record.

  Also used by max_length.py. The record's status is 'ok', 'over memory'
  (killed by the `cfg['max_rss_gib']` guard), 'timeout' or 'error'; it
  carries the worker's peak RSS (at the kill, if killed).
  """
  record = harness.measure(__file__, model_name,
                           dict(cfg, seq_len=seq_len, batch=batch), timeout_s,
                           max_rss_mib=cfg['max_rss_gib'] * 1024. or None)
  record.update(seq_len=seq_len, batch=batch)
  return record


def parse_lengths(text, flag='--seq_lens'):
  """'768,1536' -> (768, 1536), sorted and deduplicated; SystemExit if malformed."""
  try:
    lengths = sorted({int(x) for x in str(text).split(',') if x.strip()})
  except ValueError:
    raise SystemExit(f'{flag} {text!r} is not a comma-separated list of '
                     f'integers; e.g. {flag} 768,1536,3072.') from None
  if not lengths:
    raise SystemExit(f'{flag} {text!r} names no length; e.g. {flag} 768,1536.')
  return tuple(lengths)


def _parser():
  parser = harness.benchmark_parser(
      __doc__, quick='Smoke test: tiny sizes, 1 round, 2 steps, XLA '
      'optimization off; explicit flags below still override.',
      timeout='3600, 600 with --quick',
      models=harness.ALL_MODELS,
      json_help='config, every run and the summary',
      plot_help='ms per 1k tokens and peak RSS vs length')
  parser.add_argument('--seq_lens', default=None,
                      help='Comma-separated sequence lengths, each divisible '
                      'by the hierarchy\'s shortening factor, e.g. '
                      '768,1536,3072,6144,12288. Default '
                      f'{",".join(map(str, REFERENCE["seq_lens"]))} '
                      f'({",".join(map(str, QUICK["seq_lens"]))} with --quick).')
  parser.add_argument('--seq_len', type=int, default=None,
                      help='One sequence length (same as --seq_lens N).')
  parser.add_argument('--batch', type=int, default=None,
                      help='Sequences per step at every length (default: '
                      'max(1, --tokens_per_step // length)).')
  harness.add_config_flags(parser, REFERENCE, QUICK, [
      ('tokens_per_step', int, 'Tokens per step when --batch is not given.'),
      ('d_model', int), ('d_ff', int), ('n_heads', int), ('hierarchy', str),
      ('vanilla_layers', harness.parse_int_tuple),
      ('dropout', float), ('learning_rate', float),
      ('steps', int), ('warmup', int), ('rounds', int),
      ('max_rss_gib', float, 'A worker whose resident memory exceeds this is '
       'killed and reported as over memory; 0 = no limit.'),
      ('dtype', str, "`ours`' compute dtype, float32 or bfloat16 (the other "
       'models run in float32).'),
      ('remat', str, "`ours`' remat, none or blocks."),
      ('matmul_size', int, 'Size of the square float32 matmul that measures '
       'the FLOP/s peak; 0 = skip.')])
  return parser


def _resolve_config(args):
  cfg = harness.config_from_args(args, REFERENCE, QUICK, skip=('seq_lens',))
  if args.seq_len is not None and args.seq_lens is not None:
    raise SystemExit(f'Give --seq_len {args.seq_len} or --seq_lens '
                     f'{args.seq_lens}, not both.')
  if args.seq_lens is not None:
    cfg['seq_lens'] = parse_lengths(args.seq_lens)
  elif args.seq_len is not None:
    cfg['seq_lens'] = (args.seq_len,)
  # The first step compiles the training step (once: `trax_hourglass.compat`
  # stops trax compiling it again on step 2); it must stay untimed.
  if cfg['warmup'] < 1:
    raise SystemExit(f'--warmup {cfg["warmup"]} must be >= 1: the first '
                     'training step compiles.')
  if cfg['steps'] < 1 or cfg['rounds'] < 1:
    raise SystemExit('--steps and --rounds must be >= 1.')
  if cfg['tokens_per_step'] < 1:
    raise SystemExit(f'--tokens_per_step {cfg["tokens_per_step"]} must be >= 1, '
                     f'e.g. {REFERENCE["tokens_per_step"]} (8 x 768).')
  if cfg['batch'] is not None and cfg['batch'] < 1:
    raise SystemExit(f'--batch {cfg["batch"]} must be >= 1 (or leave it out '
                     'to derive it from --tokens_per_step).')
  if cfg['max_rss_gib'] < 0:
    raise SystemExit(f'--max_rss_gib {cfg["max_rss_gib"]} must be >= 0 '
                     '(0 = no memory limit).')
  if cfg['matmul_size'] < 0:
    raise SystemExit(f'--matmul_size {cfg["matmul_size"]} must be >= 0 '
                     '(0 = do not measure the matmul peak).')
  for name, allowed in (('dtype', ('float32', 'bfloat16')),
                        ('remat', ('none', 'blocks'))):
    if cfg[name] not in allowed:
      raise SystemExit(f'--{name} {cfg[name]} must be one of '
                       f'{", ".join(allowed)}.')
  harness.check_lengths(cfg['seq_lens'], cfg['hierarchy'])
  return cfg


def _summarize(models, seq_lens, runs, peak_gflops):
  """{str(length): {model: row}}: medians over ok rounds, ratios at that length.

  Models skipped at a length (a shorter one stopped them) get status
  'skipped (<why> at <length>)' and no numbers.
  """
  summary = {}
  for length in seq_lens:
    rows = summary[str(length)] = {}
    for m in models:
      mine = [r for r in runs if r['model'] == m and r['seq_len'] == length]
      ok = [r for r in mine if r['status'] == 'ok']
      tps = harness.spread(ok, 'tokens_per_s')
      gflops_median = harness.median(
          [r['gflops_per_s'] for r in ok if r.get('gflops_per_s')])
      failed = [r for r in mine if r['status'] != 'ok']
      stop = next((r for r in runs if r['model'] == m
                   and r['status'] in LIMIT_STATUSES), None)
      rows[m] = dict(
          seq_len=length, model=m,
          batch=mine[0]['batch'] if mine else None,
          status=failed[0]['status'] if failed else 'ok' if mine else (
              f'skipped ({stop["status"]} at {stop["seq_len"]})' if stop
              else 'skipped'),
          reason=failed[0].get('reason') if failed else None,
          n_runs=len(ok), **tps,
          step_ms_median=harness.median([r['step_ms'] for r in ok]),
          ms_per_1k_tokens=(1e6 / tps['tokens_per_s_median']
                            if tps['tokens_per_s_median'] else None),
          warmup_s_median=harness.median([r['warmup_s'] for r in ok]),
          # Of ok runs; of the killed run if none (its RSS at the kill).
          peak_rss_mib_max=max((r['peak_rss_mib'] for r in ok or mine),
                               default=None),
          n_params=ok[0]['n_params'] if ok else None,
          flops_per_step=ok[0].get('flops_per_step') if ok else None,
          gflops_per_s_median=gflops_median,
          pct_of_matmul_peak=(100. * gflops_median / peak_gflops
                              if gflops_median and peak_gflops else None))
    harness.add_ratios(rows, harness.BASELINES)
  return summary


def _table(models, seq_lens, summary):
  headers = ['length', 'model', 'batch', 'params', 'tokens/s (median)', 'min',
             'max', 'vs original', 'vs transformer6', 'ms/step',
             'ms/1k tokens', 'peak RSS MiB', 'GFLOP/step', 'GFLOP/s',
             '% of matmul peak', 'warmup s', 'runs', 'status']
  rows = []
  for length in seq_lens:
    for m in models:
      s = summary[str(length)][m]
      rows.append([
          length, m, harness.fmt(s['batch'], ','),
          harness.fmt(s['n_params'], ','),
          harness.fmt(s['tokens_per_s_median']),
          harness.fmt(s['tokens_per_s_min']),
          harness.fmt(s['tokens_per_s_max']),
          harness.fmt(s['ratio_vs_original'], '.2f', suffix='x'),
          harness.fmt(s['ratio_vs_transformer6'], '.2f', suffix='x'),
          harness.fmt(s['step_ms_median'], ',.1f'),
          harness.fmt(s['ms_per_1k_tokens'], ',.1f'),
          harness.fmt(s['peak_rss_mib_max'], ',.0f'),
          harness.fmt(s['flops_per_step'] and s['flops_per_step'] / 1e9,
                      ',.3g'),
          harness.fmt(s['gflops_per_s_median'], ',.2f'),
          harness.fmt(s['pct_of_matmul_peak'], '.1f', suffix='%'),
          harness.fmt(s['warmup_s_median'], '.1f'),
          s['n_runs'], s['status']])
  return harness.markdown_table(headers, rows, align='rl' + 'r' * 15 + 'l')


def _plot(models, seq_lens, summary, cfg, path):
  """ms per 1k tokens and peak RSS vs length (log-log); False if no matplotlib."""
  plt = harness.pyplot()
  if plt is None:
    return False
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
  for i, m in enumerate(models):
    rows = [summary[str(n)][m] for n in seq_lens]
    ok = [r for r in rows if r['status'] == 'ok' and r['ms_per_1k_tokens']]
    line, = ax_t.plot([r['seq_len'] for r in ok],
                      [r['ms_per_1k_tokens'] for r in ok], marker='o', label=m)
    color = line.get_color()
    ax_m.plot([r['seq_len'] for r in ok], [r['peak_rss_mib_max'] for r in ok],
              marker='o', color=color, label=m)
    for r in rows:
      if r['status'] == 'ok' or r['status'].startswith('skipped'):
        continue
      # No time to plot: mark the failure at the top of the time panel, and
      # at the RSS the worker reached (killed there if over memory).
      ax_t.plot([r['seq_len']], [0.97], marker='x', markersize=9, color=color,
                transform=ax_t.get_xaxis_transform(), linestyle='none')
      ax_t.annotate(f'{m}: {r["status"]}', (r['seq_len'], 0.97),
                    xycoords=ax_t.get_xaxis_transform(), fontsize=7,
                    color=color, rotation=90, ha='right', va='top',
                    xytext=(-4 - 9 * i, 0),  # Models failing at one length.
                    textcoords='offset points')
      if r['peak_rss_mib_max']:
        ax_m.plot([r['seq_len']], [r['peak_rss_mib_max']], marker='x',
                  markersize=9, color=color, linestyle='none')
        ax_m.annotate(r['status'], (r['seq_len'], r['peak_rss_mib_max']),
                      fontsize=7, color=color, xytext=(4, 4),
                      textcoords='offset points')
  if cfg['max_rss_gib']:
    ax_m.axhline(cfg['max_rss_gib'] * 1024., color='gray', linestyle='--',
                 label=f'--max_rss_gib {cfg["max_rss_gib"]:g}')
  batch = (f'batch {cfg["batch"]}' if cfg['batch'] else
           f'{cfg["tokens_per_step"]:,} tokens/step')
  for ax, ylabel in [(ax_t, 'ms per 1,000 training tokens'),
                     (ax_m, 'worker peak RSS (MiB)')]:
    harness.length_axis(ax, seq_lens, 'sequence length (tokens)')
    if any(y > 0 for l in ax.get_lines() for y in l.get_ydata()
           if l.get_transform() == ax.transData):  # Log of nothing fails.
      ax.set_yscale('log')
    ax.set_ylabel(ylabel)
  fig.suptitle(f'Training step, {batch}, d_model {cfg["d_model"]}, '
               f'hierarchy {cfg["hierarchy"]!r}, vanilla_layers '
               f'{tuple(cfg["vanilla_layers"])}'
               + (harness.QUICK_NOTE if cfg['fast_compile'] else ''),
               fontsize=10)
  return harness.save_figure(fig, path)


def _describe(record):
  return (f'{record["tokens_per_s"]:,.0f} tokens/s, '
          f'{record["step_ms"]:,.1f} ms/step, warmup '
          f'{record["warmup_s"]:.1f} s'
          + (f', {record["gflops_per_s"]:,.2f} GFLOP/s'
             if record.get('gflops_per_s') else ''))


def _parent(args):
  models = harness.parse_names(
      args.models, harness.ALL_MODELS + harness.ABLATION_MODELS)
  cfg = _resolve_config(args)
  seq_lens = cfg['seq_lens']
  timeout_s = args.worker_timeout or (600 if args.quick else 3600)

  peaks = [harness.matmul_peak(__file__, cfg['matmul_size'],
                               cfg['fast_compile'], 'before')]
  runs, stopped = [], {}
  for length in seq_lens:  # A model stopped at one length skips the longer.
    batch = batch_for(cfg, length)
    runs += harness.run_rounds(
        models, cfg['rounds'],
        lambda m: measure(m, cfg, length, batch, timeout_s),  # pylint: disable=cell-var-from-loop
        _describe, stopped, label=f'{length} x {batch}, ')
  peaks.append(harness.matmul_peak(__file__, cfg['matmul_size'],
                                   cfg['fast_compile'], 'after'))
  stopped = {m: dict(seq_len=r['seq_len'], status=r['status'],
                     reason=r['reason']) for m, r in stopped.items()}

  ok_peaks = [p['gflops_per_s'] for p in peaks if p and p['status'] == 'ok']
  peak_gflops = max(ok_peaks, default=None)
  summary = _summarize(models, seq_lens, runs, peak_gflops)
  shapes = ', '.join(f'{batch_for(cfg, n)} x {n}' for n in seq_lens)
  device = next((f', on {r["backend"]} ({r["device_kind"]})' for r in runs
                 if 'backend' in r), '')
  print(f'Training throughput, {shapes} tokens/step, '
        f'd_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, n_heads '
        f'{cfg["n_heads"]}, vanilla_layers {tuple(cfg["vanilla_layers"])}, '
        f'hierarchy {cfg["hierarchy"]!r}, {cfg["steps"]} timed steps x '
        f'{cfg["rounds"]} rounds{device}'
        + (harness.QUICK_NOTE if cfg['fast_compile'] else '') + '.')
  if cfg['matmul_size']:
    before, after = (
        harness.fmt(p and p.get('gflops_per_s'), ',.1f') for p in peaks)
    print(f'Matmul peak (float32 {cfg["matmul_size"]}^2 x '
          f'{cfg["matmul_size"]}, median of 10): {before} GFLOP/s before, '
          f'{after} after the models; "% of matmul peak" uses '
          f'{harness.fmt(peak_gflops, ",.1f")}. GFLOP/step: XLA cost analysis '
          'of forward + backward (no optimizer update).')
  if cfg['max_rss_gib']:
    print(f'Memory limit: a worker over {cfg["max_rss_gib"]:g} GiB resident '
          'is killed ("over memory"); a model that stops at one length skips '
          'the longer ones.')
  print()
  print(_table(models, seq_lens, summary))
  for m, stop in stopped.items():
    print(f'\n{m}: {stop["status"]} at length {stop["seq_len"]}, '
          f'{stop["reason"]}')

  plot_path = harness.plot_path(args)
  if plot_path:
    harness.write_plot(
        lambda path: _plot(models, seq_lens, summary, cfg, path), plot_path)
  if args.json:
    harness.write_json(
        args.json, benchmark='train_speed', config=cfg, models=models,
        seq_lens=list(seq_lens), matmul_peak=dict(
            before=peaks[0], after=peaks[1], gflops_per_s=peak_gflops),
        summary=summary, runs=runs, stopped=stopped,
        plot=plot_path)
  # Over memory / timeouts at long lengths are results; crashes are not.
  errors = [r for r in runs if r['status'] == 'error']
  return 1 if errors or not any(r['status'] == 'ok' for r in runs) else 0


def main(argv=None):
  return harness.main(_parser(), _worker, _parent, argv)


if __name__ == '__main__':
  sys.exit(main())
