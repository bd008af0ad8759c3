"""equal_time.py's report: the tables, the legend, the plot, the JSON.

`print_report` prints what a run measured (stdout), `write_outputs` writes
equal_time.json and equal_time.png into --out.
"""

import os

import boundaries
import harness
from equal_time_lib import data
from equal_time_lib import variants as variant_registry

CLOCK_LABELS = {'wall': 'training time',
                'cpu': "training CPU time (the worker's, XLA on one thread)"}


def label(v, r):
  return v if r['variant'] == v else f'{v} ({r["variant"]})'


def unit(cfg):
  return 'bits/dim' if data.is_images(cfg) else 'bits/byte'


def table(variants, results, cfg):
  per = unit(cfg)
  headers = ['variant', 'params', f'test {per}', f'leak {per}',
             f'valid {per}', 'train tokens/s', 'steps',
             'train CPU s' if cfg['clock'] == 'cpu' else 'train s',
             'peak RSS MiB', 'compile s']
  rows = []
  for v in variants:
    r = results[v]
    if r['status'] != 'ok':
      rows.append([label(v, r), harness.fmt(r.get('n_params'), ','),
                   'FAILED'] + ['n/a'] * 7)
      continue
    rows.append([label(v, r), harness.fmt(r['n_params'], ','),
                 harness.fmt(r['test_bits_per_byte'], '.3f'),
                 harness.fmt(r['leak_bits_per_byte'], '.3f'),
                 harness.fmt(r['valid_bits_per_byte'], '.3f'),
                 harness.fmt(r['tokens_per_s']),
                 harness.fmt(r['steps'], ','),
                 harness.fmt(r['train_s'], '.0f'),
                 harness.fmt(r['peak_rss_mib']),
                 harness.fmt(r['compile_s'], '.0f')])
    for other in variant_registry.factors(r['variant'], cfg)[1]:
      rows.append([f'{v}@{other}', harness.fmt(r['n_params'], ','),
                   harness.fmt(r[f'test_bits_per_byte_at_{other}'], '.3f')]
                  + ['same run'] * 7)
  return harness.markdown_table(headers, rows)


def factor_table(variants, results, cfg):
  """The shorten-factor dropout family as the slides' Table 4: rows trained
  with, columns evaluated at; None with fewer than two such rows."""
  scored = {}
  for v in variants:
    r = results[v]
    factor, others = variant_registry.factors(r['variant'], cfg)
    if r['status'] == 'ok' and factor:
      scored[v] = {factor: r['test_bits_per_byte'], **{
          f: r[f'test_bits_per_byte_at_{f}'] for f in others}}
  if len(scored) < 2:
    return None
  factors = sorted({f for s in scored.values() for f in s})
  trained = lambda v: (
      f'{v}: k in {{{", ".join(map(str, factors))}}}' if v == 'sfd' else
      f'{v}: k = {variant_registry.factors(v, cfg)[0]}')
  return harness.markdown_table(
      ['trained with'] + [f'eval at k={f}' for f in factors],
      [[trained(v)] + [harness.fmt(s.get(f), '.3f') for f in factors]
       for v, s in scored.items()])


def plot(variants, results, cfg, title, path):
  """Validation bits/byte vs training seconds, one line per variant; False
  if matplotlib is not installed."""
  plt = harness.pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  ax.set_prop_cycle(color=plt.get_cmap('tab20').colors)  # 12 ablations: distinct.
  for v in variants:
    r = results[v]
    if r['status'] != 'ok':
      continue
    points = [p for p in r['curve'] if p['timed_steps'] > 0]
    ax.plot([p['step' if cfg['steps'] else 'train_s'] for p in points],
            [p['bits_per_byte'] for p in points], marker='o', markersize=3,
            label=label(v, r), linestyle='--' if r['variant'] == 'no_shift'
            else '-')
  ax.set_xlabel('training steps' if cfg['steps'] else CLOCK_LABELS[cfg['clock']]
                + ' (s, compilation and evaluation excluded)')
  ax.set_ylabel(f'validation {unit(cfg)}')
  ax.set_title(f'{title}: d_model {cfg["d_model"]}, {cfg["batch"]} x '
               f'{cfg["seq_len"]} {"dims" if data.is_images(cfg) else "bytes"}/'
               f'step, {os.path.basename(cfg["data"])}', fontsize=10)
  return harness.save_figure(fig, path)



def _data_note(r):
  """What a variant trained and was scored on (its record's counts)."""
  if 'image_shape' in r:
    return (f' ({r["train_images"]:,} training images of '
            f'{"x".join(map(str, r["image_shape"]))}, validation = the next '
            f'{r["valid_images"]:,}, test = {r["test_images"]:,} test images, '
            f'scored on {r["test_scored_images"]:,})')
  return (f' ({r["data_bytes"]:,} bytes; train = first '
          f'{r["train_bytes"]:,}, validation = next '
          f'{r["valid_bytes"]:,}, test = last {r["test_bytes"]:,}, '
          f'scored on {r["test_scored_bytes"]:,}'
          + (' [wrapping]' if r['test_wraps'] else '') + ')')



def _header(title, ok, cfg):
  """What each variant trained on, how long, at which sizes."""
  budget = (f'{cfg["steps"]:,} steps' if cfg['steps'] else
            f'{cfg["seconds"]:g} ' + (
                'CPU s (XLA on one thread, --clock cpu)'
                if cfg['clock'] == 'cpu' else 's')
            + ' (compilation and evaluation excluded)')
  return (f'{title}: each variant trained {budget} on '
          f'{os.path.basename(cfg["data"])}'
          + (_data_note(ok[0]) if ok else '')
          + f'; d_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, '
          f'{cfg["n_heads"]} heads, dropout {cfg["dropout"]:g}, {cfg["batch"]}'
          f' x {cfg["seq_len"]} {"dims" if data.is_images(cfg) else "bytes"}'
          f'/step, Adam {cfg["learning_rate"]:g} after '
          f'{cfg["warmup_steps"]} warmup steps, seed {harness.SEED}'
          + (f', on {ok[0]["backend"]} ({ok[0]["device_kind"]}, '
             f'{os.cpu_count()} CPUs)' if ok else '')
          + (harness.QUICK_NOTE if cfg['fast_compile'] else '') + ':\n')


def _boundaries_note(variants, results, cfg):
  """The boundaries suite's k and the shortening each variant achieved."""
  return (f'k = {cfg["boundary_factor"]}: the divisor of --seq_len nearest '
          f'{cfg["whitespace_segment"]:.2f}, the mean bytes per whitespace '
          'segment of the training split' + (
              f'; unigram: k = {cfg["unigram_factor"]}, nearest '
              f'{cfg["unigram_segment"]:.2f}, the mean bytes per segment of '
              'its targets there' if 'unigram_factor' in cfg else '')
          + '. Shortening achieved on the test split (benchmarks/'
          f'boundaries.py draws the segments):\n\n'
          f'{boundaries.table(variants, results)}\n')


def descriptions(variants, results, cfg):
  """{variant: its legend} (the params suite's depth as its worker chose)."""
  return {v: variant_registry.describe(results[v]['variant'], dict(
      cfg, flat_layers=results[v].get('flat_layers'))) for v in variants}


def _legend(variants, results, cfg):
  lines = []
  described = descriptions(variants, results, cfg)
  for v in variants:
    r = results[v]
    lines.append(
        f'- {label(v, r)}: {described[v]}'
        + (f'; run in place of PureLSHSelfAttentionWrapper, which failed: '
           f'{r["wrapper_error"]}' if 'wrapper_error' in r else ''))
    if 'flat_layers' in r:
      lines.append(
          f'  {r["flat_layers"]} layers: {r["n_params"]:,} parameters, the '
          f'hourglass {r["hourglass_params"]:,} '
          f'({r["n_params"] / r["hourglass_params"] - 1:+.1%}).')
  return '\n'.join(lines)


def print_report(title, variants, results, cfg, completion, failed, command):
  """The run's tables, legend and notes, on stdout."""
  ok = [results[v] for v in variants if results[v]['status'] == 'ok']
  print(_header(title, ok, cfg))
  print(table(variants, results, cfg))
  print()
  by_factor = factor_table(variants, results, cfg)
  if by_factor:
    print(f'Test {unit(cfg)} by the shorten factor trained with (rows) and '
          f'evaluated at (columns):\n\n{by_factor}\n')
  if 'boundary_factor' in cfg:
    print(_boundaries_note(variants, results, cfg))
  print(_legend(variants, results, cfg))
  if completion and completion['status'] == 'ok':
    print(f'\nCompletions by {completion["variant"]}, the lowest test '
          f'{unit(cfg)} (top row: the first {completion["images"]} test '
          f'images; below: {completion["rows"]} samples of the bottom half '
          f'given the top): {completion["png"]}')
  loads = [(v, results[v]['load_before'][0], results[v]['load_after'][0])
           for v in variants if results[v]['status'] == 'ok']
  if loads:
    print('\n1-min load average before/after each variant: '
          + ', '.join(f'{v} {a:.1f}/{b:.1f}' for v, a, b in loads)
          + f' ({os.cpu_count()} CPUs).')
  for name, reason in failed.items():
    print(f'\n{name}: FAILED, {reason}')
  print(f'\nCommand: {command}')


def write_outputs(out, title, variants, results, cfg, completion, failed,
                  command):
  """equal_time.json (everything) and equal_time.png (the curves) in `out`."""
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, 'equal_time.json')
  harness.write_json(
      json_path, benchmark='equal_time', command=command,
      clock=cfg['clock'], config=cfg, variants=variants, results=results,
      descriptions=descriptions(variants, results, cfg),
      completion=completion, failed=failed)
  png_path = os.path.join(out, 'equal_time.png')
  if plot(variants, results, cfg, title, png_path):
    print(f'Wrote {json_path} and {png_path}.')
  else:
    print(f'Wrote {json_path}; no plot: matplotlib is not installed.')
