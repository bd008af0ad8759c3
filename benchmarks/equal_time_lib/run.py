"""equal_time.py's two sides: the parent runs the variants, a worker trains one.

The parent resolves the config, trains each variant in its own worker
(`--jobs` at once), the images suite's best model completes images, and the
report is printed (and written with --out). A worker trains one variant
(`train.train`) or, named 'complete:VARIANT', completes the images.
"""

import concurrent.futures
import functools
import math
import os
import shlex
import tempfile
import time

import harness
from equal_time_lib import completion as completions
from equal_time_lib import config
from equal_time_lib import data
from equal_time_lib import report
from equal_time_lib import train
from equal_time_lib.variants import LSH_FALLBACK


def main(suites, argv=None):
  """equal_time.py's entry: the parent, or with --_worker a worker."""
  return harness.main(config.parser(suites), worker,
                      functools.partial(parent, suites=suites), argv)


def worker(name, cfg):
  """Trains one variant in this (fresh) process, or with 'complete:VARIANT'
  completes images with its saved weights; prints one result line."""
  if cfg['clock'] == 'cpu':
    harness.one_xla_thread()
  variant = name.split(':')[-1]
  job = completions.complete if name.startswith('complete:') else train.train
  return harness.work(functools.partial(job, variant, cfg), 'ours',
                      variant=variant, load_before=os.getloadavg())


def command_line(script, argv):
  script = os.path.relpath(os.path.abspath(script), harness.REPO_ROOT)
  return ' '.join(shlex.quote(a) for a in ['python', script] + list(argv))


def _run_variant(script, variant, cfg, timeout_s):
  record = harness.measure(script, variant, cfg, timeout_s, key='variant')
  harness.log(f'{variant}: ' + harness.record_line(
      record, lambda r: f'test {r["test_bits_per_byte"]:.4f} bits/byte, leak '
      f'{r["leak_bits_per_byte"]:.4f}, {r["tokens_per_s"]:,.0f} tokens/s, '
      f'{r["steps"]} steps'))
  return record


def _run_all(script, variants, cfg, jobs, timeout_s):
  """{variant: its worker's record}, `jobs` workers at once."""

  def run(v):
    record = _run_variant(script, v, cfg, timeout_s)
    if v == 'lsh' and record['status'] != 'ok':
      harness.log('lsh: PureLSHSelfAttentionWrapper failed; running '
                  'LSHSelfAttention.')
      record = dict(_run_variant(script, LSH_FALLBACK, cfg, timeout_s),
                    wrapper_error=record['reason'])
    return record

  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    return dict(zip(variants, pool.map(run, variants)))


def parent(args, suites):
  """Trains and scores the chosen variants; prints (and writes) the report."""
  variants = (list(suites.suites[args.suite]) if args.variants is None else
              harness.parse_names(args.variants, suites.all_variants,
                                  '--variants'))
  cfg = config.resolve(args, variants, suites)
  title = (f'Equal training {"steps" if cfg["steps"] else "time"}'
           + (f', suite {args.suite!r}' if args.variants is None else ''))
  # One thread on a crowded machine: CPU seconds may come at a tenth the rate.
  timeout_s = args.worker_timeout or (
      math.inf if cfg['steps'] else
      (10 if cfg['clock'] == 'cpu' else 2) * cfg['seconds'] + 1200)
  start = time.perf_counter()
  weights_dir = tempfile.TemporaryDirectory()  # Images: for the completions.
  if data.is_images(cfg) and args.out:
    cfg['weights_dir'] = weights_dir.name
  results = _run_all(suites.script, variants, cfg, args.jobs, timeout_s)
  failed = {r['variant']: r['reason'] for r in results.values()
            if r['status'] != 'ok'}
  ok = [results[v] for v in variants if results[v]['status'] == 'ok']
  completion = None
  if ok and 'weights_dir' in cfg:
    completion = completions.complete_best(suites.script, results, cfg,
                                           args.out, timeout_s)
    if completion['status'] != 'ok':
      failed['completions'] = completion['reason']
  weights_dir.cleanup()
  cfg.pop('weights_dir', None)

  command = command_line(suites.script, args.argv)
  report.print_report(title, variants, results, cfg, completion, failed,
                      command)
  harness.log(f'total {time.perf_counter() - start:.0f} s')
  if args.out:
    report.write_outputs(args.out, title, variants, results, cfg, completion,
                         failed, command)
  return 1 if failed or not ok else 0
