"""Helpers shared by the benchmark scripts in `benchmarks/`.

Benchmarks here run every measurement in its own fresh Python process (a
"worker") so that JAX compilation caches, allocator state and trax's global
state never leak from one model into another. The parent never imports trax: it
only spawns workers, parses the single JSON line each one prints, and reports.

A script is both: `main` runs its parent, or with the hidden `--_worker NAME
--_config JSON` flags one measurement (`work`). The parent `measure`s each
model in a worker, round after round (`run_rounds`), and reports medians
(`spread`, `add_ratios`, `markdown_table`, `write_json`, `write_plot`).

Model names understood by `make_model`:
  ours          -- `trax_hourglass.HourglassLM` (this repository),
  original      -- `trax.models.research.hourglass.HourglassLM` (trax 1.4.1),
  transformer6  -- `trax.models.TransformerLM`, 6 layers, same width,
  transformer12 -- `trax.models.TransformerLM`, 12 layers, same width.
and ablations, never run by default, each `ours` but for one thing:
  ours_tl_dense -- trax's `tl.Dense` backward pass instead of
                   `trax_hourglass.layers.Dense`'s,
  ours_bfloat16 -- dtype='bfloat16' (the config's dtype is ignored),
  ours_remat    -- remat='blocks' (the config's remat is ignored).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Workers import the working tree's `trax_hourglass`, installed or not.
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

ALL_MODELS = ('ours', 'original', 'transformer6', 'transformer12')
ABLATION_MODELS = ('ours_tl_dense', 'ours_bfloat16', 'ours_remat')
BASELINES = ('original', 'transformer6')

# Marks the one stdout line a worker prints for its parent; trax, TF and gym
# print their own chatter to stdout/stderr, so the parent looks for this.
RESULT_PREFIX = 'BENCHMARK_RESULT '

SEED = 0
# XLA backend optimization level 0 halves compile time, which dominates a
# --quick smoke run; its timings are then not a measurement.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',)
QUICK_NOTE = (' [--quick: XLA optimization off, smoke test only, not a '
              'measurement]')


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
  """Imports trax with `trax_hourglass.compat` applied, as for every model."""
  if model_name.startswith('ours'):
    from trax_hourglass import HourglassLM  # pylint: disable=g-import-not-at-top,unused-import
  else:
    from trax_hourglass import compat  # pylint: disable=g-import-not-at-top
    compat.apply()
  import trax  # pylint: disable=g-import-not-at-top
  return trax


def config_from_args(args, reference, quick, skip=()):
  """`quick` if args.quick else `reference`, with every flag the user gave.

  A flag overrides the config key of its name when it is not None; names in
  `skip` are left for the caller (flags that need parsing).
  """
  cfg = dict(quick if args.quick else reference)
  for name in cfg:
    value = getattr(args, name, None)
    if value is not None and name not in skip:
      cfg[name] = value
  return cfg


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
  record.update(self_peak_rss_mib=self_peak_rss_mib(), **device_summary())
  emit_result(record)
  return 0


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


def never(step):
  """For `training.Loop`'s checkpoint_at / eval_at: benchmarks save nothing."""
  del step
  return False


def make_model(name, cfg, mode='train'):
  """Uninitialized model `name` (in `mode`) of benchmark config `cfg`.

  `cfg`: vocab_size, d_model, d_ff, n_heads, dropout, seq_len, and for the
  Hourglass models vanilla_layers and hierarchy; optionally max_len (`ours`'
  predict-mode cache, the Transformers' positions; default max(2048, seq_len)),
  and `ours`' dtype and remat (default float32, none).
  """
  import trax  # pylint: disable=g-import-not-at-top
  width = dict(d_model=cfg['d_model'], d_ff=cfg['d_ff'],
               n_heads=cfg['n_heads'], dropout=cfg['dropout'], mode=mode)
  max_len = cfg.get('max_len') or max(2048, cfg['seq_len'])
  if name == 'ours_tl_dense':  # This worker process only: trax's forward,
    import trax.layers as tl  # pylint: disable=g-import-not-at-top
    from trax_hourglass.layers import dense  # pylint: disable=g-import-not-at-top
    dense.Dense.forward = tl.Dense.forward  # hence jax's derived backward.
    name = 'ours'
  if name in ('ours_bfloat16', 'ours_remat'):
    cfg = dict(cfg, **({'dtype': 'bfloat16'} if name == 'ours_bfloat16'
                       else {'remat': 'blocks'}))
    name = 'ours'
  if name in ('ours', 'original'):
    if name == 'ours':
      from trax_hourglass import HourglassLM  # pylint: disable=g-import-not-at-top
      if mode == 'predict':
        width['max_len'] = max_len
      width.update(dtype=cfg.get('dtype', 'float32'),
                   remat=cfg.get('remat', 'none'))
    else:
      from trax.models.research.hourglass import HourglassLM  # pylint: disable=g-import-not-at-top
    return HourglassLM(cfg['vocab_size'],
                       vanilla_layers=tuple(cfg['vanilla_layers']),
                       hierarchy=cfg['hierarchy'], **width)
  if name in ('transformer6', 'transformer12'):
    n_layers = int(name[len('transformer'):])
    # Positional embeddings must cover the sequence; 2048 is trax's default.
    return trax.models.TransformerLM(cfg['vocab_size'], n_layers=n_layers,
                                     max_len=max_len,
                                     **width)
  raise ValueError(f'Unknown model {name!r}; expected one of '
                   f'{ALL_MODELS + ABLATION_MODELS}.')


def random_lm_batches(vocab_size, batch, seq_len, n_distinct=4, seed=SEED):
  """Endless (inputs, targets, weights) LM batches of random tokens, in memory.

  A few batches are generated up front and cycled, so the data pipeline costs
  nothing inside the timed region.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(n_distinct):
    tokens = rng.integers(1, vocab_size, size=(batch, seq_len), dtype=np.int32)
    weights = np.ones((batch, seq_len), dtype=np.float32)
    batches.append((tokens, tokens, weights))  # LM: the model shifts right.
  while True:
    yield from batches


def count_params(weights):
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(getattr(w, 'size', 0) for w in jax.tree_util.tree_leaves(weights)))


def block(tree):
  """Waits until every array in `tree` is computed (JAX dispatches async)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(tree)
  return tree


def device_summary():
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {'backend': jax.default_backend(), 'n_devices': len(devices),
          'device_kind': devices[0].device_kind, 'jax': jax.__version__}


def self_peak_rss_mib():
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.  # KiB on Linux.


def emit_result(record):
  """Prints the worker's one result line (flushes: the parent reads it after exit)."""
  print(RESULT_PREFIX + json.dumps(record, sort_keys=True), flush=True)


def parse_result(stdout):
  """Returns the last worker result dict found in `stdout`, or None."""
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  return None


def proc_rss_mib(pid):
  """Current resident set size of process `pid` in MiB, or None if unreadable."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024.  # Reported in kB.
  except (OSError, ValueError, IndexError):
    pass  # Not Linux, or the process is exiting.
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
          rss = proc_rss_mib(proc.pid)
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
                peak_rss_mib=rusage.ru_maxrss / 1024.)  # KiB on Linux.


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
      log(f'[{label}round {rnd + 1}/{n_rounds}] {name}: '
          + record_line(record, describe))
      if record['status'] != 'ok':
        stopped[name] = record
  return runs


def split_stopped(stopped):
  """`run_rounds`' stopped as (skipped {name: reason}, failed {name: record})."""
  skipped = {m: r['reason'] for m, r in stopped.items()
             if r['status'] == 'unavailable'}
  return skipped, {m: r for m, r in stopped.items() if m not in skipped}


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


def train_step_flops(model, batch, weights=None, state=None):
  """XLA's FLOP count of one forward + backward pass of an LM and its loss.

  `model` maps tokens [batch, length] to logits; of `batch` (inputs, targets,
  weights) only shapes and dtypes are used. Lowers (does not compile: at long
  lengths that costs minutes) `jax.value_and_grad` of `model.pure_fn` and a
  masked cross-entropy; returns XLA's `HloCostAnalysis` FLOPs (matmuls as
  2*M*N*K, elementwise ops one per element; no optimizer update), or None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  weights = model.weights if weights is None else weights
  state = model.state if state is None else state

  def loss(w, s, inputs, targets, mask, rng):
    logits, _ = model.pure_fn(inputs, w, s, rng)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)

  spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype)
  lowered = jax.jit(jax.value_and_grad(loss)).lower(
      weights, state, *[spec(a) for a in batch], jax.random.PRNGKey(SEED))
  flops = (lowered.cost_analysis() or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def matmul_peak_worker(size=2048, reps=10, warmup=3):
  """Times a jitted float32 [size, size] @ [size, size]; prints one result line.

  The reference for "achieved FLOP/s": the rate this process reaches on the one
  operation XLA's CPU backend runs best (a large dense matmul, all cores).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  record = dict(model='matmul_peak', status='ok', pid=os.getpid(), size=size)
  keys = jax.random.split(jax.random.PRNGKey(SEED))
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
                **device_summary())
  emit_result(record)
  return 0


def tail(text, n_lines=15):
  return '\n'.join(text.strip().splitlines()[-n_lines:])


def median(xs):
  return statistics.median(xs) if xs else None


def fmt(x, spec=',.0f', missing='n/a', suffix=''):
  return missing if x is None else format(x, spec) + suffix


def markdown_table(headers, rows, align=None):
  """Returns a GitHub-markdown table; `align` is a string of 'l'/'r' per column."""
  align = align or 'l' + 'r' * (len(headers) - 1)
  rule = ['---:' if a == 'r' else ':---' for a in align]
  lines = [headers, rule] + [[str(c) for c in row] for row in rows]
  return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines)


def parse_int_tuple(text):
  """'2,2' or '(2, 2)' -> (2, 2)."""
  return tuple(int(x) for x in text.strip('()[] ').split(',') if x.strip())


def max_shorten_factor(hierarchy):
  """Total shortening of a hierarchy like '2@1 8@3 2@1'; None if it does not
  parse (the model constructor then judges it)."""
  try:
    return parse_hierarchy(hierarchy).total_factor
  except ValueError:
    return None


def parse_hierarchy(hierarchy, vanilla_layers=(1, 1)):
  """`trax_hourglass.hierarchy.parse_hierarchy`, without importing trax.

  Parents never import trax, which the package's `__init__` does: the module,
  plain Python, is loaded on its own.
  """
  module = (sys.modules.get('trax_hourglass.hierarchy') or
            sys.modules.get('_trax_hourglass_hierarchy'))
  if module is None:
    spec = importlib.util.spec_from_file_location(
        '_trax_hourglass_hierarchy',
        os.path.join(REPO_ROOT, 'trax_hourglass', 'hierarchy.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # For dataclasses, as an import would.
    spec.loader.exec_module(module)
  return module.parse_hierarchy(hierarchy, vanilla_layers)


def parse_names(text, known, flag='--models'):
  """'a,b' -> ['a', 'b']; SystemExit naming the unknown ones."""
  names = [m.strip() for m in text.split(',') if m.strip()]
  unknown = sorted(set(names) - set(known))
  if unknown or not names:
    raise SystemExit(f'Unknown {flag} {unknown}; choose from '
                     f'{",".join(known)}.')
  return names


# ------------------------------------------------------------ command line --


def benchmark_parser(doc, quick, timeout, models=None, json_help=None,
                     plot_help=None):
  """The shared flags: --quick, --worker_timeout, the hidden worker flags, and
  if given --models, --json, --plot."""
  parser = argparse.ArgumentParser(
      description=doc.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  if models is not None:
    parser.add_argument('--models', default=','.join(models),
                        help='Comma-separated subset of %(default)s'
                        + (', or the ablation ' + ','.join(ABLATION_MODELS)
                           + ' (see benchmarks/_common.py)'
                           if models == ALL_MODELS else '') + '.')
  parser.add_argument('--quick', action='store_true', help=quick)
  if json_help:
    parser.add_argument('--json', metavar='PATH',
                        help=f'Also write {json_help} here.')
  if plot_help:
    parser.add_argument('--plot', metavar='PATH',
                        help=f'PNG of {plot_help} (default: the --json path '
                        'with .png, else no plot).')
  parser.add_argument('--worker_timeout', type=float, default=None,
                      help=f'Seconds before a worker is killed (default '
                      f'{timeout}).')
  # Internal: run one measurement in this process (spawned by the parent).
  parser.add_argument('--_worker', metavar='MODEL', help=argparse.SUPPRESS)
  parser.add_argument('--_config', help=argparse.SUPPRESS)
  return parser


def add_config_flags(parser, reference, quick, flags):
  """A --name flag per (name, type[, help]) overriding `config_from_args`'s."""
  for name, type_, *text in flags:
    # None = "take it from the reference (or --quick) configuration".
    parser.add_argument(f'--{name}', type=type_, default=None,
                        help=' '.join(text + [
                            f'Default {reference[name]!r} ({quick[name]!r} '
                            'with --quick).']))


def main(parser, worker, parent, argv=None):
  """A script's entry: `worker(name, cfg)` with --_worker, else `parent(args)`.

  Both return the exit status; `args.argv` is the command line.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  args.argv = argv
  if args._worker:  # pylint: disable=protected-access
    return worker(args._worker, json.loads(args._config))  # pylint: disable=protected-access
  return parent(args)


# ----------------------------------------------------------------- reports --


def pyplot():
  """matplotlib.pyplot drawing to files (Agg), or None if not installed."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt


def plot_path(args):
  """--plot, else the --json path with .png, else None (no plot)."""
  return args.plot or (os.path.splitext(args.json)[0] + '.png'
                       if args.json else None)


def length_axis(ax, lengths, label):
  """Log2 x axis ticked at the sequence `lengths`, labelled `label`."""
  ax.set_xscale('log', base=2)
  ax.set_xticks(list(lengths))
  ax.set_xticklabels([f'{n:,}' for n in lengths], fontsize=8)
  ax.xaxis.set_minor_locator(pyplot().NullLocator())
  ax.set_xlabel(label)


def save_figure(fig, path):
  """Grids and legends every plot of `fig`, writes it to `path`, frees it."""
  for ax in fig.axes:
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)
  return True  # For `write_plot`: plotted.


def write_plot(plot, path):
  """Calls `plot(path)` (False: no matplotlib); prints where it went or why not.

  Never raises: a plot must not lose the measurements (or the JSON after it).
  """
  try:
    plotted = plot(path)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    plotted = f'failed, {type(e).__name__}: {e}'
  print(f'\nPlot: {path}' if plotted is True else
        f'\nNo plot: {plotted or "matplotlib is not installed"}.')


def write_json(path, **report):
  """Writes `report` as indented JSON with sorted keys."""
  with open(path, 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)
