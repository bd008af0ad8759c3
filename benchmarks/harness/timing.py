"""Timing: rounds of workers, medians and ratios, and what the clocks count.

The parent runs each name's worker round after round (`run_rounds`) and
reports medians (`spread`, `add_ratios`). In a worker, `block` stops a clock
only once JAX has computed, `one_xla_thread` makes CPU seconds count work,
and `matmul_peak_worker` times the reference for "achieved FLOP/s".
"""

import os
import statistics
import time

from harness import workers


def block(tree):
  """Waits until every array in `tree` is computed (JAX dispatches async)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(tree)
  return tree


def run_steps(loop, n):
  """Seconds `loop.run(n)` takes until the weights it trains are computed."""
  start = time.perf_counter()
  loop.run(n)
  block((loop.model.weights, loop.model.state))
  return time.perf_counter() - start


def median(xs):
  return statistics.median(xs) if xs else None


def spread(runs, field):
  """{field_median, field_min, field_max} of `field` over `runs` (None if none)."""
  values = [r[field] for r in runs]
  return {f'{field}_median': median(values),
          f'{field}_min': min(values) if values else None,
          f'{field}_max': max(values) if values else None}


def add_ratios(rows, baselines, field='tokens_per_s_median'):
  """Adds ratio_vs_<base> = row[field] / rows[base][field] to every row."""
  for row in rows.values():
    for base in baselines:
      b = rows.get(base, {}).get(field)
      mine = row[field]
      row[f'ratio_vs_{base}'] = mine / b if mine and b else None


def run_rounds(names, n_rounds, measure_fn, describe, stopped, label=''):
  """Every record of `measure_fn(name)`, `n_rounds` times each, with 'round'.

  Each round starts one name later, so that slow drifts of a shared machine
  hit all names alike and none always runs first or last. Each record is
  logged (`record_line`; `label` starts the bracket, e.g. '768 x 8, '); a name
  whose record is not 'ok' goes into `stopped` ({name: record}) and is not
  measured again.
  """
  runs = []
  for rnd in range(n_rounds):
    k = rnd % len(names)
    for name in names[k:] + names[:k]:
      if name in stopped:
        continue
      record = measure_fn(name)
      record['round'] = rnd
      runs.append(record)
      workers.log(f'[{label}round {rnd + 1}/{n_rounds}] {name}: '
                  + workers.record_line(record, describe))
      if record['status'] != 'ok':
        stopped[name] = record
  return runs


def split_stopped(stopped):
  """`run_rounds`' stopped as (skipped {name: reason}, failed {name: record})."""
  skipped = {m: r['reason'] for m, r in stopped.items()
             if r['status'] == 'unavailable'}
  return skipped, {m: r for m, r in stopped.items() if m not in skipped}


def one_xla_thread():
  """Makes XLA:CPU in this process compute on one thread; call before jax starts.

  For a CPU-seconds clock (`time.process_time`) that counts work, not waiting:
  a pool of threads also burns CPU spinning while they wait for each other.
  XLA sizes its CPU thread pool by the CPUs the process may run on
  (--xla_cpu_multi_thread_eigen=false alone leaves two threads busy), so the
  backend starts while the process is pinned to one CPU; then every thread may
  run anywhere again, and the OS puts the one compute thread on a free core.
  """
  cpus = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cpus)})
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # Creates the CPU client and its thread pool.
  for tid in os.listdir('/proc/self/task'):
    try:
      os.sched_setaffinity(int(tid), cpus)
    except ProcessLookupError:  # A thread that has ended since.
      pass


def xla_threads():
  """XLA:CPU compute threads in this process: those jaxlib names
  `tf_XLAEigen` (0 where it names none, as jaxlib 0.4, or off Linux)."""
  try:
    return sum('XLAEigen' in open(f'/proc/self/task/{tid}/comm').read()
               for tid in os.listdir('/proc/self/task'))
  except OSError:
    return 0


def matmul_peak(script, size, fast_compile, when):
  """`matmul_peak_worker`'s record, in a fresh worker of `script` (which runs
  it for the name 'matmul_peak'); None if `size` is 0."""
  if not size:
    return None
  record = workers.measure(script, 'matmul_peak', dict(
      size=size, fast_compile=fast_compile), 300)
  workers.log(f'matmul peak ({when}): ' + workers.record_line(
      record, lambda r: f'{r["gflops_per_s"]:,.1f} GFLOP/s (float32 '
      f'{size}^2 x {size})'))
  return record


def matmul_peak_worker(size=2048, reps=10, warmup=3):
  """Times a jitted float32 [size, size] @ [size, size]; prints one result line.

  The reference for "achieved FLOP/s": the rate this process reaches on the one
  operation XLA's CPU backend runs best (a large dense matmul, all cores).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  record = dict(model='matmul_peak', status='ok', pid=os.getpid(), size=size)
  keys = jax.random.split(jax.random.PRNGKey(workers.SEED))
  a, b = (jax.random.normal(k, (size, size), jnp.float32) for k in keys)
  matmul = jax.jit(jnp.matmul)
  for _ in range(warmup):  # The first call compiles.
    block(matmul(a, b))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    block(matmul(a, b))
    times.append(time.perf_counter() - start)
  flops = 2. * size ** 3
  record.update(reps=reps, median_s=median(times), min_s=min(times),
                gflops_per_s=flops / median(times) / 1e9,
                gflops_per_s_best=flops / min(times) / 1e9,
                **workers.device_summary())
  workers.emit_result(record)
  return 0
