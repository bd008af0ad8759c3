"""Longest sequence each model trains on within a memory limit (default 20 GiB).

For each model (see train_speed.py), trains with batch 1 at lengths `--start`
* 2^n (768, 1536, ...) until one goes over `--max_rss_gib` of resident memory,
fails, times out or would pass `--max_seq_len`, then bisects between the last
length that fit and the first that did not, in multiples of `--granularity`,
for `--bisect_steps` steps. Each attempt is a train_speed.py worker (reference
sizes, 1 compiling + 1 timed step) whose resident memory the parent polls every
50 ms, killing it at the limit; "fits" means it finished both steps under it.

Reproduce (from the repository root; 30-45 minutes per model on a 2-core CPU):

  python benchmarks/max_length.py --json /tmp/max_length.json \
      --plot /tmp/max_length.png

Quick smoke run (train_speed.py --quick sizes, lengths 48 and 96):

  python benchmarks/max_length.py --quick --models ours
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_speed  # pylint: disable=g-import-not-at-top,wrong-import-position

# Search settings on top of train_speed's sizes; one timed step at batch 1.
REFERENCE = dict(train_speed.REFERENCE, batch=1, steps=1, warmup=1,
                 count_flops=False, start=768, granularity=768,
                 max_seq_len=98304, bisect_steps=2, max_rss_gib=20.)
QUICK = dict(train_speed.QUICK, batch=1, steps=1, warmup=1,
             count_flops=False, start=48, granularity=48, max_seq_len=96,
             bisect_steps=2, max_rss_gib=20.)


def search_max_length(fits, start, max_len, granularity, bisect_steps):
  """Longest length in multiples of `granularity` for which `fits` holds.

  Doubles from `start` until `fits(length) -> (ok, info)` fails or the next
  length would pass `max_len` (then `max_len` itself is tried), then bisects
  for up to `bisect_steps` steps. Assumes that what fits at one length fits at
  every shorter one.

  Returns:
    dict(longest=the longest length that fit, or None if `start` did not;
    first_failure=the shortest length found not to fit, or None if `max_len`
    fit; failure_info=`info` of that failure; longest_info=`info` of the
    longest fit; tried=[(length, ok, info)] in the order tried).
  """
  tried = []

  def attempt(length):
    ok, info = fits(length)
    tried.append((length, bool(ok), info))
    return ok, info

  longest = failure = longest_info = failure_info = None
  length = start
  while True:
    ok, info = attempt(length)
    if not ok:
      failure, failure_info = length, info
      break
    longest, longest_info = length, info
    if length >= max_len:
      break
    length = min(2 * length, max_len)
  if longest is not None and failure is not None:
    for _ in range(bisect_steps):
      mid = (longest + failure) // 2 // granularity * granularity
      if mid <= longest:  # No multiple of `granularity` left in between.
        break
      ok, info = attempt(mid)
      if ok:
        longest, longest_info = mid, info
      else:
        failure, failure_info = mid, info
  return dict(longest=longest, first_failure=failure,
              failure_info=failure_info, longest_info=longest_info,
              tried=tried)


def _parser():
  parser = harness.benchmark_parser(
      __doc__, quick='Smoke test: train_speed.py --quick sizes, lengths 48 '
      'and 96, XLA optimization off.', timeout='1800, 600 with --quick; an '
      'attempt killed counts as not fitting',
      models=harness.ALL_MODELS,
      json_help='config, every attempt and the result',
      plot_help='peak RSS vs length')
  harness.add_config_flags(parser, REFERENCE, QUICK, [
      ('start', int, 'First length tried.'),
      ('granularity', int, 'Bisection step; every length is a multiple.'),
      ('max_seq_len', int, 'Longest length tried.'),
      ('bisect_steps', int, 'Bisection steps after the doubling.'),
      ('max_rss_gib', float, 'Memory limit (resident set, GiB).')])
  return parser


def _resolve_config(args):
  cfg = harness.config_from_args(args, REFERENCE, QUICK)
  harness.check_lengths([cfg['granularity']], cfg['hierarchy'],
                        flag='--granularity')
  for name in ('start', 'max_seq_len'):
    if cfg[name] < 1 or cfg[name] % cfg['granularity']:
      raise SystemExit(f'--{name} {cfg[name]} must be a positive multiple of '
                       f'--granularity {cfg["granularity"]}.')
  if cfg['max_seq_len'] < cfg['start']:
    raise SystemExit(f'--max_seq_len {cfg["max_seq_len"]} must be >= --start '
                     f'{cfg["start"]}.')
  if cfg['bisect_steps'] < 0:
    raise SystemExit(f'--bisect_steps {cfg["bisect_steps"]} must be >= 0.')
  if cfg['max_rss_gib'] <= 0:
    raise SystemExit(f'--max_rss_gib {cfg["max_rss_gib"]} must be > 0: the '
                     'search stops at the memory limit.')
  return cfg


def _why(result, cfg):
  """Why the search stopped: the first failure's status, or the cap."""
  if result['first_failure'] is None:
    return f'cap (--max_seq_len {cfg["max_seq_len"]})'
  info = result['failure_info']
  if info['status'] == 'over memory' and 'reason' in info and (
      'allocat' in info['reason']):  # XLA refused the allocation up front.
    reason = ' '.join(str(info['reason']).split())
    return 'over memory (' + reason[reason.find('Out of memory'):][:80] + ')'
  if info['status'] == 'over memory':
    return f'over memory ({info["peak_rss_mib"]:,.0f} MiB at the kill)'
  reason = ' '.join(str(info.get('reason', '')).split())[:100]
  return f'{info["status"]}: {reason}'.strip(': ')


def _table(models, results, cfg):
  headers = ['model', 'longest length trained', 'its peak RSS MiB',
             'its ms/step', 'first length that did not fit', 'why',
             'lengths tried']
  rows = []
  for m in models:
    r = results[m]
    best = r['longest_info'] or {}
    rows.append([
        m, harness.fmt(r['longest'], ',', missing='none'),
        harness.fmt(best.get('peak_rss_mib'), ',.0f'),
        harness.fmt(best.get('step_ms'), ',.0f'),
        harness.fmt(r['first_failure'], ',', missing='none'),
        _why(r, cfg).replace('|', '/'),
        ' '.join(f'{n}{"" if ok else "x"}' for n, ok, _ in r['tried'])])
  return harness.markdown_table(headers, rows, align='lrrrrll')


def _plot(models, results, cfg, path):
  """Peak RSS vs length (log-log) with the limit; False if no matplotlib."""
  plt = harness.pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  lengths = set()
  for m in models:
    tried = sorted(results[m]['tried'], key=lambda t: t[0])
    ok = [(n, info['peak_rss_mib']) for n, fit, info in tried if fit]
    line, = ax.plot([n for n, _ in ok], [rss for _, rss in ok], marker='o',
                    label=m)
    for n, fit, info in tried:
      lengths.add(n)
      if not fit and info.get('peak_rss_mib'):
        ax.plot([n], [info['peak_rss_mib']], marker='x', markersize=9,
                linestyle='none', color=line.get_color())
    # Label only the search's outcome; every attempt would overlap.
    r = results[m]
    labels = [(r['longest'], r['longest_info'], f'{m}: longest {{:,}}'),
              (r['first_failure'], r['failure_info'], '{:,}: {status}')]
    for n, info, text in labels:
      if n is not None and info.get('peak_rss_mib'):
        ax.annotate(text.format(n, status=info['status']),
                    (n, info['peak_rss_mib']), fontsize=7,
                    color=line.get_color(), xytext=(4, -10),
                    textcoords='offset points')
  ax.axhline(cfg['max_rss_gib'] * 1024., color='gray', linestyle='--',
             label=f'limit {cfg["max_rss_gib"]:g} GiB')
  ax.set_yscale('log')  # The limit line is always there: log has data.
  doubling = sorted(n for n in lengths if (n // cfg['start']) & (
      n // cfg['start'] - 1) == 0)  # Powers of two times --start.
  harness.length_axis(ax, doubling, 'sequence length (batch 1)')
  ax.set_ylabel('worker peak RSS (MiB); x: did not fit')
  ax.set_title(f'Training memory vs length, d_model {cfg["d_model"]}, '
               f'hierarchy {cfg["hierarchy"]!r}'
               + (harness.QUICK_NOTE if cfg['fast_compile'] else ''),
               fontsize=10)
  return harness.save_figure(fig, path)


def _parent(args):
  models = harness.parse_names(
      args.models, harness.ALL_MODELS + harness.ABLATION_MODELS)
  cfg = _resolve_config(args)
  timeout_s = args.worker_timeout or (600 if args.quick else 1800)

  results = {}
  for m in models:
    def fits(length, m=m):
      record = train_speed.measure(m, cfg, length, 1, timeout_s)
      harness.log(f'{m} at {length:,}: ' + harness.record_line(
          record, lambda r: f'fits, {r["step_ms"]:,.0f} ms/step'))
      return record['status'] == 'ok', record
    results[m] = search_max_length(fits, cfg['start'], cfg['max_seq_len'],
                                   cfg['granularity'], cfg['bisect_steps'])

  print(f'Longest trainable sequence (batch 1, 1 compiling + 1 timed step) '
        f'within {cfg["max_rss_gib"]:g} GiB resident memory: d_model '
        f'{cfg["d_model"]}, d_ff {cfg["d_ff"]}, n_heads {cfg["n_heads"]}, '
        f'vanilla_layers {tuple(cfg["vanilla_layers"])}, hierarchy '
        f'{cfg["hierarchy"]!r}; lengths {cfg["start"]} x 2^n up to '
        f'{cfg["max_seq_len"]}, then {cfg["bisect_steps"]} bisection steps in '
        f'multiples of {cfg["granularity"]}'
        + (harness.QUICK_NOTE if cfg['fast_compile'] else '') + '.\n')
  print(_table(models, results, cfg))
  print('\n"lengths tried": in order; x = did not fit.')

  plot_path = harness.plot_path(args)
  if plot_path:
    harness.write_plot(lambda path: _plot(models, results, cfg, path),
                       plot_path)
  if args.json:
    harness.write_json(args.json, benchmark='max_length', config=cfg,
                       models=models, results=results,
                       plot=plot_path)
  # An error (not over memory / timeout) at the very first length is a bug.
  broken = [m for m in models if results[m]['longest'] is None
            and results[m]['failure_info']['status'] == 'error']
  return 1 if broken else 0


def main(argv=None):
  return harness.main(_parser(), None, _parent, argv)


if __name__ == '__main__':
  sys.exit(main())
