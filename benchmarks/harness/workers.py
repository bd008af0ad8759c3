"""Worker processes: spawning one, its one result line, and its body.

Every measurement runs in its own fresh Python process (a "worker") so that
JAX compilation caches, allocator state and trax's global state never leak
from one model into another. The parent never imports trax: `measure` runs
`SCRIPT --_worker NAME --_config JSON` (`run_worker`: killed at a timeout or
a memory limit) and parses the one line the worker prints (`emit_result`);
the worker's body is `work`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from harness import memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Marks the one stdout line a worker prints for its parent; trax, TF and gym
# print their own chatter to stdout/stderr, so the parent looks for this.
RESULT_PREFIX = 'BENCHMARK_RESULT '

SEED = 0
# XLA backend optimization level 0 halves compile time, which dominates a
# --quick smoke run; its timings are then not a measurement.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',)


def worker_env(xla_flags=()):
  """Environment for worker processes: fixed hash seed, quiet TF, repo on path."""
  env = dict(os.environ)
  if xla_flags:  # Appended: flags the user exported stay in effect.
    env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', ''), *xla_flags]).strip()
  env['PYTHONHASHSEED'] = str(SEED)  # Same dict/set iteration order every run.
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
  return env


def import_trax(model_name):
  """Imports trax with `trax_hourglass.compat` applied, as for every model:
  the jax shims and, as workers train with trax's own Loop, the training
  fixes (`trax_hourglass.install_training_fixes`)."""
  if model_name.startswith('ours'):
    from trax_hourglass import HourglassLM  # pylint: disable=g-import-not-at-top,unused-import
  from trax_hourglass import compat  # pylint: disable=g-import-not-at-top
  compat.apply()
  import trax  # pylint: disable=g-import-not-at-top
  return trax


def work(measure_fn, import_as, **record):
  """A worker process's body: `measure_fn(trax, record)` fills in `record`.

  Trax is imported as for model `import_as` (timed). Prints the record
  (starting as the given fields) as the one result line, with status 'ok',
  'error' or 'over memory' (and the reason); returns the exit status.
  """
  record = dict(record, status='ok', pid=os.getpid())
  start = time.perf_counter()
  trax = import_trax(import_as)
  record['import_s'] = time.perf_counter() - start
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    np.random.seed(SEED)
    measure_fn(trax, record)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    reason = f'{type(e).__name__}: {e}'[:2000]
    # XLA refusing an allocation larger than the machine is running out of
    # memory too, only sooner than the parent's guard would see it.
    out_of_memory = 'Out of memory' in reason or 'RESOURCE_EXHAUSTED' in reason
    record.update(status='over memory' if out_of_memory else 'error',
                  reason=reason)
    emit_result(record)
    return 1
  record.update(self_peak_rss_mib=memory.self_peak_rss_mib(),
                **device_summary())
  emit_result(record)
  return 0


def device_summary():
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {'backend': jax.default_backend(), 'n_devices': len(devices),
          'device_kind': devices[0].device_kind, 'jax': jax.__version__}


def emit_result(record):
  """Prints the worker's one result line (flushes: the parent reads it after exit)."""
  print(RESULT_PREFIX + json.dumps(record, sort_keys=True), flush=True)


def parse_result(stdout):
  """Returns the last worker result dict found in `stdout`, or None."""
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  return None


def run_worker(argv, timeout_s, xla_flags=(), max_rss_mib=None):
  """Runs `argv` as a child process: dict(returncode, stdout, stderr, wall_s,
  peak_rss_mib, timed_out, over_memory).

  The child is killed after `timeout_s`, or as soon as its resident memory
  (VmRSS, polled every 50 ms) exceeds `max_rss_mib`, before the machine swaps.
  It is reaped with `os.wait4`, which gives that one child's rusage
  (`RUSAGE_CHILDREN` would mix all children reaped so far).
  """
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=err,
                            env=worker_env(xla_flags),
                            cwd=REPO_ROOT)
    timed_out = over_memory = False
    try:
      while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
          break
        if time.perf_counter() - start > timeout_s:
          timed_out = True
        elif max_rss_mib is not None:
          rss = memory.proc_rss_mib(proc.pid)
          over_memory = rss is not None and rss > max_rss_mib
        if timed_out or over_memory:
          proc.kill()
          _, status, rusage = os.wait4(proc.pid, 0)
          break
        time.sleep(0.05)
    except BaseException:  # E.g. Ctrl-C: do not leave the worker running.
      proc.kill()
      os.wait4(proc.pid, 0)
      raise
    wall_s = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # Reaped by us.
    out.seek(0)
    err.seek(0)
    return dict(returncode=proc.returncode, stdout=out.read(),
                stderr=err.read(), wall_s=wall_s, timed_out=timed_out,
                over_memory=over_memory,
                peak_rss_mib=memory.rusage_peak_mib(rusage))


def worker_failure_status(proc):
  """(status, reason) of a worker that printed no result line."""
  if proc.get('over_memory'):
    return 'over memory', (f'killed at {proc["peak_rss_mib"]:,.0f} MiB '
                           f'resident memory')
  if proc['timed_out']:
    return 'timeout', f'timed out after {proc["wall_s"]:,.0f} s'
  return 'error', f'worker exited {proc["returncode"]} without a result'


def xla_flags(cfg):
  """The workers' extra XLA flags: fast compilation for --quick configs."""
  return FAST_COMPILE_XLA_FLAGS if cfg.get('fast_compile') else ()


def measure(script, name, cfg, timeout_s, max_rss_mib=None, key='model'):
  """Runs `script --_worker name --_config JSON(cfg)` in a fresh process.

  Returns the worker's record, or {key: name, status, reason} if it printed
  none or was killed; with peak_rss_mib, worker_wall_s, returncode, and for
  failures stderr_tail.
  """
  argv = [sys.executable, os.path.abspath(script), '--_worker', name,
          '--_config', json.dumps(cfg)]
  proc = run_worker(argv, timeout_s, xla_flags=xla_flags(cfg),
                    max_rss_mib=max_rss_mib)
  record = parse_result(proc['stdout'])
  if record is None or proc['over_memory'] or proc['timed_out']:
    status, reason = worker_failure_status(proc)
    record = {key: name, 'status': status, 'reason': reason}
  record.update(peak_rss_mib=proc['peak_rss_mib'],
                worker_wall_s=proc['wall_s'], returncode=proc['returncode'])
  if record['status'] != 'ok':
    record['stderr_tail'] = tail(proc['stderr'])
  return record


def tail(text, n_lines=15):
  return '\n'.join(text.strip().splitlines()[-n_lines:])


def log(message):
  """Progress goes to stderr, the results to stdout."""
  print(message, file=sys.stderr, flush=True)


def record_line(record, describe):
  """One progress line of a worker's record: `describe(record)` if it is ok."""
  if record['status'] == 'ok':
    return (f'{describe(record)}, peak RSS {record["peak_rss_mib"]:,.0f} MiB, '
            f'process {record["worker_wall_s"]:.1f} s')
  return (f'{record["status"].upper()}: {record["reason"]}'
          + (f'\n{record["stderr_tail"]}' if record.get('stderr_tail') else ''))
