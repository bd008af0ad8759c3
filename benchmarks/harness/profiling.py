"""Device operations of a traced call (jax.profiler), per unit of work.

`device_ops` reads the operations a perfetto trace holds; `per_unit` sums
them by kind per token (or any unit); `per_unit_table` prints the longest.
"""

import glob
import gzip
import json
import os
import re

from harness import report


def device_ops(trace_dir):
  """[(name, start µs, duration µs)]: the device operations of a trace.

  Reads the perfetto trace `jax.profiler.trace(create_perfetto_trace=True)`
  writes. On an accelerator these are the events of its device planes' GPU
  streams (kernels, copies; untested here) or else their 'XLA Ops' lines
  (TPUs), not the lines derived from them; on the CPU, those of XLA's own
  threads, less its runtime functions (named with '::') and the
  'end: <operation>' mark inside each operation. Only innermost events count:
  a loop or a conditional is counted as the operations it runs.
  """
  path, = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  with gzip.open(path, 'rt') as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = {(e['name'], e.get('pid'), e.get('tid')): e.get('args', {}).get(
      'name', '') for e in events if e.get('ph') == 'M'}
  devices = {pid for (kind, pid, _), name in names.items()
             if kind == 'process_name' and name.startswith('/device:')}
  lines = {(pid, tid): name for (kind, pid, tid), name in names.items()
           if kind == 'thread_name'}
  device_lines = {k: n for k, n in lines.items() if k[0] in devices}
  line = ('Stream' if any(n.startswith('Stream') for n in
                          device_lines.values()) else 'XLA Ops')

  def is_device(e):
    name = lines.get((e.get('pid'), e.get('tid')), '')
    if devices:
      return e.get('pid') in devices and name.startswith(line)
    return (name.startswith('tf_XLA') and '::' not in e['name']
            and not e['name'].startswith('end: '))

  lanes = {}
  for e in events:
    if e.get('ph') == 'X' and is_device(e):
      lanes.setdefault((e['pid'], e['tid']), []).append(
          (float(e['ts']), float(e.get('dur', 0.)), e['name']))
  ops = []
  for lane in lanes.values():
    lane.sort(key=lambda x: (x[0], -x[1]))  # Enclosing events first.
    for i, (ts, dur, name) in enumerate(lane):
      inner = i + 1 < len(lane) and lane[i + 1][0] < ts + dur
      if not inner:
        ops.append((name, ts, dur))
  return ops


def per_unit(ops, wall_s, n, n_top):
  """What a traced call of `n` units (tokens) ran, per unit: wall ms,
  operations, busy ms, and the `n_top` kinds of operation that took longest
  as (kind, count, ms)."""
  by_name = {}
  for name, _, dur_us in ops:
    kind = re.sub(r'([._]\d+)+$', '', name)  # fusion.12 -> fusion
    count, total = by_name.get(kind, (0, 0.))
    by_name[kind] = (count + 1, total + dur_us)
  top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:n_top]
  return dict(
      wall_ms_per_token=1000. * wall_s / n, ops_per_token=len(ops) / n,
      busy_ms_per_token=sum(d for *_, d in ops) / 1000. / n,
      top=[(name, count / n, total / 1000. / n)
           for name, (count, total) in top])


def per_unit_table(name, profile):
  """`per_unit`'s profile of a traced call of `name`, per token."""
  rows = [[kind, report.fmt(count, ',.1f'), report.fmt(ms, ',.3f')]
          for kind, count, ms in profile['top']]
  return (f'\n{name}, one traced call, per token: '
          f'{profile["wall_ms_per_token"]:.2f}'
          f' ms wall, {profile["ops_per_token"]:,.0f} device operations busy '
          f'for {profile["busy_ms_per_token"]:.2f} ms; the longest:\n\n'
          + report.markdown_table(['operation', 'count', 'ms'], rows))
