"""Sampling speed (new tokens/s) of Hourglass vs. the original and a Transformer.

Measures how fast each model generates tokens one after another (temperature
1, random weights: only speed matters). A model name is an architecture and a
decoding loop:

  ours           trax_hourglass.HourglassLM(mode='predict'), relative attention
  ours_rotary    the same with RotaryCausalAttention at every level
  ours_sparse    the same with ff_sparsity=--ff_sparsity (sparse suite)
  transformer12  trax.models.TransformerLM(mode='predict'), 12 layers, same
                 d_model/d_ff/n_heads
  original       trax.models.research.hourglass.HourglassLM in 'eval' mode, as
                 trax's Hourglass sampling notebook does it: one full forward
                 pass per token over a fixed buffer of `--n_tokens` (rounded
                 up to the shorten factor), jitted once; its cost does not
                 depend on the position, so `--original_tokens` are timed

  <name>         sampled with trax's `decoding.autoregressive_sample_stream`
                 (one jitted model call per token, sampling on the host)
  <name>_sample  sampled with `trax_hourglass.decoding.sample` (model step and
                 sampling fused, many tokens per call, caches donated): the
                 same loop for every architecture
  <name>@<L>     built with max_len L (position suite)

Suites (`--suite`), on the reference configuration (vocab 256, hierarchy
'2@1 8@3 2@1', d_model 256, d_ff 1024, n_heads 4) unless said:

  reference  batch 1, 1,024 new tokens, max_len 2,048; every loop, the
             original, and trax's per-token overhead (ms/token of a model in
             trax's loop minus in ours)
  long       batch 1, 4,096 new tokens, max_len 8,192
  batch      batch 16, 1,024 new tokens, max_len 2,048 (total tokens/s)
  position   256 new tokens at max_len 512 and 8,192, relative and rotary:
             a step costs what the position reached costs, not the cache size
  sparse     hierarchy '1@1 2@3 1@1', d_model 1,024, d_ff 16,384, 8 heads,
             max_len 512, 128 tokens: dense against ff_sparsity=64, batch 1
  paper      the paper's enwik8 size: hierarchy '5@1 24@3 5@1', d_model 512,
             d_ff 2,048, 8 heads, max_len 2,048, batch 1, 1,024 tokens, our
             loop (`--dtype bfloat16`: ours in mixed precision)
  paper_batch  the same at batch 16

The table's tokens/s exclude compilation; its "first call" column includes
it, as a user meets it: the tokens of the first call of a fresh process
(trax's loop: all of them; ours: the timed call) over the seconds from the
call to its last token, compilation included ("compile s": the compiling
tokens or call alone). Timing excludes compilation: for the streams, the first `--warmup` tokens
(2: the first call compiles, and the second is slow too, as jit sees the
model's new state as committed arrays); for the `_sample` models, an untimed
first call of 2 tokens compiles, then `--repeats` calls (default 1; 5 in the
position suite, whose calls take under a second) each generate all
`--n_tokens`, and the median call counts (its progress reports give time per
token against position, plotted with `--plot`); for `original`, one untimed
forward pass. Every (model, round) runs in a fresh process, rounds rotate the
order, and the table reports medians, min/max and ratios of medians.

Reproduce (from the repository root; results in benchmarks/results/sampling):

  python benchmarks/sample_speed.py --suite reference --json r.json
  python benchmarks/sample_speed.py --suite long --json long.json --plot long.png
  python benchmarks/sample_speed.py --models ours_sample,transformer12_sample \
      --rounds 1 --n_tokens 256 --profile 12     # device operations per token

Quick smoke run (tiny sizes, 1 round, XLA optimization off; its numbers mean
nothing; used by tests/test_benchmarks.py):

  python benchmarks/sample_speed.py --quick
"""

import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from harness.profiling import device_ops  # pylint: disable=g-import-not-at-top,wrong-import-position

ARCHITECTURES = ('ours', 'ours_rotary', 'ours_sparse', 'original',
                 'transformer12')
REFERENCE = dict(vocab_size=256, d_model=256, d_ff=1024, n_heads=4,
                 vanilla_layers=(2, 2), hierarchy='8@3', dropout=0.0,
                 n_tokens=1024, original_tokens=32, max_len=2048, batch=1,
                 ff_sparsity=64, warmup=2, temperature=1.0, rounds=3,
                 repeats=1, profile=0, fast_compile=False, dtype='float32')
QUICK = dict(REFERENCE, d_model=32, d_ff=64, n_heads=2, vanilla_layers=(1, 1),
             hierarchy='1@3', n_tokens=24, original_tokens=4, max_len=48,
             ff_sparsity=4, rounds=1, fast_compile=True)
# The paper's enwik8 model (Nawrot et al. 2021): 2,048 bytes.
PAPER = dict(d_model=512, d_ff=2048, n_heads=8, vanilla_layers=(5, 5),
             hierarchy='24@3', max_len=2048)
# suite: (config overrides, models, (model, baseline) ratios printed).
SUITES = {
    'reference': ({}, ('ours', 'ours_sample', 'original', 'transformer12',
                       'transformer12_sample'),
                  (('ours', 'original'), ('ours', 'transformer12'),
                   ('ours_sample', 'original'),
                   ('ours_sample', 'transformer12'),
                   ('ours_sample', 'transformer12_sample'))),
    'long': (dict(n_tokens=4096, max_len=8192),
             ('ours_sample', 'transformer12_sample'),
             (('ours_sample', 'transformer12_sample'),)),
    'batch': (dict(batch=16), ('ours_sample', 'transformer12_sample'),
              (('ours_sample', 'transformer12_sample'),)),
    'position': (dict(n_tokens=256, repeats=5),
                 ('ours_sample@512', 'ours_sample@8192',
                  'ours_rotary_sample@512', 'ours_rotary_sample@8192'),
                 (('ours_sample@512', 'ours_sample@8192'),
                  ('ours_rotary_sample@512', 'ours_rotary_sample@8192'))),
    'sparse': (dict(d_model=1024, d_ff=16384, n_heads=8, vanilla_layers=(1, 1),
                    hierarchy='2@3', max_len=512, n_tokens=128),
               ('ours_sample', 'ours_sparse_sample'),
               (('ours_sparse_sample', 'ours_sample'),)),
    'paper': (PAPER, ('ours_sample', 'transformer12_sample'),
              (('ours_sample', 'transformer12_sample'),)),
    'paper_batch': (dict(PAPER, batch=16),
                    ('ours_sample', 'transformer12_sample'),
                    (('ours_sample', 'transformer12_sample'),)),
}
# A stream's ms/token minus the same architecture's in our loop.
OVERHEAD = (('ours', 'ours_sample'), ('transformer12', 'transformer12_sample'))


def _parse_model(name):
  """'ours_rotary_sample@512' -> ('ours_rotary', True, 512)."""
  name, _, max_len = name.partition('@')
  in_our_loop = name.endswith('_sample')
  return (name[:-len('_sample')] if in_our_loop else name, in_our_loop,
          int(max_len) if max_len else None)


def _buffer_len(cfg):
  """The original's fixed buffer: n_tokens rounded up to its shorten factor."""
  factor = harness.max_shorten_factor(cfg['hierarchy']) or 1
  return -(-cfg['n_tokens'] // factor) * factor


def _build(arch, cfg):
  """The model `arch` of `cfg`, uninitialized."""
  if arch == 'transformer12':
    # trax's TransformerLM does not pass max_len to its attention, whose
    # predict-mode cache would stay at 2,048 slots (and clamp writes past it).
    import gin  # pylint: disable=g-import-not-at-top
    gin.bind_parameter('trax.layers.CausalAttention.max_inference_length',
                       cfg['max_len'])
  if arch in ('original', 'transformer12'):
    return harness.make_model(arch, dict(cfg, seq_len=_buffer_len(cfg)),
                              mode='eval' if arch == 'original' else 'predict')
  import trax_hourglass as th  # pylint: disable=g-import-not-at-top
  extra = {}
  if arch == 'ours_rotary':
    extra = dict(vanilla_attn_type=th.layers.RotaryCausalAttention,
                 middle_attn_type=th.layers.RotaryCausalAttention)
  elif arch == 'ours_sparse':
    extra = dict(ff_sparsity=cfg['ff_sparsity'])
  return th.HourglassLM(
      cfg['vocab_size'], d_model=cfg['d_model'], d_ff=cfg['d_ff'],
      n_heads=cfg['n_heads'], dropout=cfg['dropout'],
      vanilla_layers=tuple(cfg['vanilla_layers']), hierarchy=cfg['hierarchy'],
      mode='predict', max_len=cfg['max_len'], dtype=cfg['dtype'], **extra)


def _time_stream(model, cfg):
  """Times autoregressive_sample_stream after `warmup` (compiling) tokens."""
  from trax.supervised import decoding  # pylint: disable=g-import-not-at-top
  stream = decoding.autoregressive_sample_stream(
      model, batch_size=cfg['batch'], temperature=cfg['temperature'])
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
  """Times trax_hourglass.decoding.sample after a compiling call: the median
  of `repeats` calls."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  batch = cfg['batch']
  start = time.perf_counter()
  decoding.sample(model, 2, batch_size=batch, temperature=cfg['temperature'],
                  seed=1)
  compile_ms = 1000. * (time.perf_counter() - start)
  calls = []  # (seconds, [(tokens done per sequence, seconds since start)])
  for _ in range(cfg['repeats']):
    progress = []
    start = time.perf_counter()
    tokens = decoding.sample(
        model, cfg['n_tokens'], batch_size=batch,
        temperature=cfg['temperature'],
        progress=lambda done, *_, p=progress, t0=start: p.append(
            (done, time.perf_counter() - t0)))
    calls.append((time.perf_counter() - start, progress))
    assert tokens.shape == (batch, cfg['n_tokens']), tokens.shape
  elapsed, progress = sorted(calls, key=lambda c: c[0])[len(calls) // 2]
  extra = dict(first_tokens_ms=[compile_ms], progress=progress,
               calls_s=[seconds for seconds, _ in calls])
  if cfg['profile']:
    extra['profile'] = _profile_sample(decoding, model, cfg)
  return cfg['n_tokens'], elapsed, extra


def _profile_sample(decoding, model, cfg):
  """One more call of `cfg['n_tokens']` under jax.profiler, per token."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      decoding.sample(model, cfg['n_tokens'], batch_size=cfg['batch'],
                      temperature=cfg['temperature'])
      wall_s = time.perf_counter() - start
    ops = device_ops(trace_dir)
  return harness.per_unit(ops, wall_s, cfg['n_tokens'], cfg['profile'])


def _time_original(trax, model, cfg):
  """One jitted eval forward pass over the whole buffer per new token."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fwd = trax.fastmath.jit(lambda x, w, s, r: model.pure_fn(x, w, s, r)[0])
  weights, state = model.weights, model.state
  rng = trax.fastmath.random.get_prng(harness.SEED)
  sampler = np.random.default_rng(harness.SEED)
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


def weight_bytes_per_token(model):
  """Bytes of weights a predict-mode HourglassLM reads per token, on average.

  Counted from the model's weight shapes: the layers of a `ShortenedLevel`'s
  `shortening` part run once every k tokens of their level; an embedding reads
  one row; a sparse FF's main part reads the chosen row of w1 and w2 in each
  block (its controller is a layer of its own, read whole); any other layer
  reads all its weights. Caches are not counted.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import trax.layers as tl  # pylint: disable=g-import-not-at-top

  def walk(layer, weights, rate):
    if isinstance(weights, dict):  # A shared layer: counted where first met.
      return 0.
    if layer.sublayers:
      slow, k = {id(l) for l in getattr(layer, 'shortening', ())}, getattr(
          layer, 'shorten_factor', 1)
      return sum(walk(l, w, rate / k if id(l) in slow else rate)
                 for l, w in zip(layer.sublayers, weights))
    leaves = jax.tree_util.tree_leaves(weights)
    sizes = [w.size for w in leaves]
    if isinstance(layer, tl.Embedding):
      sizes = [leaves[0].shape[-1]]
    elif type(layer).__name__ == '_ChosenUnitsFF':  # w1, w2, b2.
      (d_model, blocks, _), (_, _, d_out) = leaves[0].shape, leaves[1].shape
      sizes = [d_model * blocks, blocks * d_out, leaves[2].size]
    return rate * sum(sizes) * (leaves[0].dtype.itemsize if leaves else 0)
  return walk(model, model.weights, 1.0)


def _measure(model_name, cfg, trax, record):
  """Builds and times `model_name` in this worker; fills in `record`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  arch, in_our_loop, max_len = _parse_model(model_name)
  cfg = dict(cfg, max_len=max_len or cfg['max_len'])
  start = time.perf_counter()
  model = _build(arch, cfg)
  batch = 1 if arch == 'original' else cfg['batch']
  length = _buffer_len(cfg) if arch == 'original' else 1
  model.init(trax.shapes.ShapeDtype((batch, length), np.int32))
  harness.block(model.weights)
  record['init_s'] = time.perf_counter() - start
  record['n_params'] = harness.count_params(model.weights)
  if arch in ('ours', 'ours_sparse'):
    record['weight_bytes_per_token'] = weight_bytes_per_token(model)
  if arch == 'original':
    n, elapsed, extra = _time_original(trax, model, cfg)
  elif in_our_loop:
    n, elapsed, extra = _time_sample(model, cfg)
  else:
    n, elapsed, extra = _time_stream(model, cfg)
  record.update(extra, timed_s=elapsed, timed_tokens=n, batch=batch,
                max_len=cfg['max_len'], tokens_per_s=batch * n / elapsed,
                ms_per_token=1000. * elapsed / n)
  if arch != 'original':  # The first call, compilation inside (see above).
    first_s = sum(extra['first_tokens_ms']) / 1000. + elapsed
    first_n = n if in_our_loop else n + len(extra['first_tokens_ms'])
    record.update(first_call_s=first_s,
                  first_call_tokens_per_s=batch * first_n / first_s)


def _worker(model_name, cfg):
  """Measures one model in this (fresh) process; prints one result line."""
  arch = _parse_model(model_name)[0]
  return harness.work(functools.partial(_measure, model_name, cfg),
                      'ours' if arch.startswith('ours') else arch,
                      model=model_name)


def _parser():
  parser = harness.benchmark_parser(
      __doc__, quick='Smoke test: tiny sizes, 1 round, XLA optimization off; '
      'explicit flags below still override.', timeout='1800, 600 with --quick',
      models=None, json_help='config, every run and the summary',
      plot_help='time per token against position (the _sample models)')
  parser.add_argument('--suite', default='reference', choices=sorted(SUITES),
                      help='What to compare (see above); default reference.')
  parser.add_argument('--models', default=None,
                      help="Comma-separated subset of the suite's models "
                      '(default: all of them).')
  harness.add_config_flags(parser, REFERENCE, QUICK, [
      ('d_model', int), ('d_ff', int), ('n_heads', int), ('hierarchy', str),
      ('vanilla_layers', harness.parse_int_tuple), ('n_tokens', int),
      ('original_tokens', int), ('max_len', int), ('batch', int),
      ('ff_sparsity', int), ('warmup', int), ('temperature', float),
      ('rounds', int), ('repeats', int),
      ('dtype', str, "`ours`' compute dtype, float32 or bfloat16 (the "
       'Transformer and the original: float32).'),
      ('profile', int, 'Trace one more call of each _sample model with '
       "jax.profiler and print the device operations a token runs, the N that "
       'take longest by name; 0: no trace.')])
  return parser


def _resolve_config(args):
  overrides = SUITES[args.suite][0]
  cfg = harness.config_from_args(
      args, dict(REFERENCE, **overrides),
      dict(QUICK, **{k: v for k, v in overrides.items() if k == 'batch'}))
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
  if cfg['dtype'] not in ('float32', 'bfloat16'):
    raise SystemExit(f"--dtype {cfg['dtype']}: use float32 or bfloat16.")
  if (min(cfg['rounds'], cfg['repeats'], cfg['batch']) < 1
      or cfg['temperature'] <= 0 or cfg['profile'] < 0):
    raise SystemExit('--rounds, --repeats and --batch must be >= 1, '
                     '--temperature > 0 and --profile >= 0.')
  return cfg


def _summarize(models, runs):
  """Per-model medians over successful rounds, and ratios to each other."""
  summary = {}
  for m in models:
    ok = [r for r in runs if r['model'] == m and r['status'] == 'ok']
    summary[m] = dict(
        n_runs=len(ok), **harness.spread(ok, 'tokens_per_s'),
        ms_per_token_median=harness.median([r['ms_per_token'] for r in ok]),
        compile_s_median=harness.median(
            [sum(r['first_tokens_ms']) / 1000. for r in ok]),
        first_call_tokens_per_s_median=harness.median(
            [r['first_call_tokens_per_s'] for r in ok
             if 'first_call_tokens_per_s' in r]),
        peak_rss_mib_max=max((r['peak_rss_mib'] for r in ok), default=None),
        n_params=ok[0]['n_params'] if ok else None,
        weight_bytes_per_token=ok[0].get('weight_bytes_per_token') if ok
        else None)
  harness.add_ratios(summary, models)
  return summary


def _table(models, summary, baselines):
  headers = (['model', 'params', 'tokens/s (median)', 'min', 'max']
             + [f'vs {b}' for b in baselines]
             + ['ms/token', 'first call tokens/s', 'compile s', 'peak RSS MiB',
                'runs'])
  rows = []
  for m in models:
    s = summary[m]
    rows.append(
        [m, harness.fmt(s['n_params'], ','),
         harness.fmt(s['tokens_per_s_median'], ',.1f'),
         harness.fmt(s['tokens_per_s_min'], ',.1f'),
         harness.fmt(s['tokens_per_s_max'], ',.1f')]
        + [harness.fmt(s[f'ratio_vs_{b}'], '.2f', suffix='x')
           for b in baselines]
        + [harness.fmt(s['ms_per_token_median'], ',.2f'),
           harness.fmt(s['first_call_tokens_per_s_median'], ',.1f'),
           harness.fmt(s['compile_s_median'], '.1f'),
           harness.fmt(s['peak_rss_mib_max'], ',.0f'), s['n_runs']])
  return harness.markdown_table(headers, rows)



def _median_run(runs, model, field):
  """`model`'s successful run of median tokens/s among those with `field`."""
  ok = sorted((r for r in runs if r['model'] == model and r['status'] == 'ok'
               and r.get(field)), key=lambda r: r['tokens_per_s'])
  return ok[len(ok) // 2] if ok else None


def per_token_ms(progress):
  """[(position, ms per token step)] between a run's progress reports."""
  points, (done0, t0) = [], (0, 0.0)
  for done, t in progress:
    if done > done0:
      points.append(((done0 + done) / 2, 1000. * (t - t0) / (done - done0)))
    done0, t0 = done, t
  return points[1:]  # The first interval holds the prefill and a tiny call.


def _plot(runs, models, cfg, path):
  lines = {m: per_token_ms(run['progress']) for m in models
           if (run := _median_run(runs, m, 'progress'))}
  if not any(lines.values()):
    # Progress comes about once a second: a shorter call has no interval.
    return 'the timed calls were too short for progress reports to plot'
  plt = harness.pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(7, 4))
  for m, points in lines.items():
    ax.plot([p for p, _ in points], [ms for _, ms in points], marker='.',
            label=f'{m} (median run)')
  ax.set_xlabel('position (tokens decoded)')
  ax.set_ylabel('ms per token step')
  ax.set_ylim(bottom=0)
  ax.set_title(f'batch {cfg["batch"]}, max_len {cfg["max_len"]}, '
               f'd_model {cfg["d_model"]}', fontsize=9)
  return harness.save_figure(fig, path)


def _parent(args):
  cfg = _resolve_config(args)
  suite_models, ratios = SUITES[args.suite][1], SUITES[args.suite][2]
  models = (suite_models if args.models is None else
            harness.parse_names(args.models, suite_models))
  timeout_s = args.worker_timeout or (600 if args.quick else 1800)
  stopped = {}
  runs = harness.run_rounds(
      models, cfg['rounds'],
      lambda m: harness.measure(__file__, m, cfg, timeout_s),
      lambda r: (f'{r["tokens_per_s"]:,.1f} tokens/s ({r["timed_tokens"]} '
                 'timed), first tokens '
                 + ', '.join(f'{x:,.0f}' for x in r['first_tokens_ms'])
                 + ' ms'), stopped)
  skipped, failed = harness.split_stopped(stopped)
  failed = {m: r['reason'] for m, r in failed.items()}
  summary = _summarize(models, runs)
  ran = [m for m in models if m not in skipped]
  baselines = [b for b in dict.fromkeys(b for _, b in ratios) if b in ran]
  print(f'Sampling speed, suite {args.suite}: batch {cfg["batch"]}, '
        f'{cfg["n_tokens"]} new tokens'
        + (f' (original: {cfg["original_tokens"]} tokens over a '
           f'{_buffer_len(cfg)}-token buffer)' if 'original' in ran else '')
        + f', d_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, n_heads '
        f'{cfg["n_heads"]}, vanilla_layers {tuple(cfg["vanilla_layers"])}, '
        f'hierarchy {cfg["hierarchy"]!r}, max_len '
        + (f'{cfg["max_len"]}' if not any(_parse_model(m)[2] for m in ran)
           else 'as named (@L)')
        + (f', ff_sparsity {cfg["ff_sparsity"]}' if args.suite == 'sparse'
           else '') + (f', ours in {cfg["dtype"]}' if cfg['dtype'] !=
                       'float32' else '') + f', {cfg["rounds"]} rounds'
        + (f', on {runs[0]["backend"]} ({runs[0]["device_kind"]})'
           if runs and 'backend' in runs[0] else '')
        + (harness.QUICK_NOTE if cfg['fast_compile'] else '') + ':\n')
  print(_table(ran, summary, baselines))
  lines = [f'{m} / {base}: {summary[m][f"ratio_vs_{base}"]:.2f}x'
           for m, base in ratios
           if m in ran and summary[m].get(f'ratio_vs_{base}') is not None]
  first = 'first_call_tokens_per_s_median'
  lines += [f'{m} / {base}, first call (compilation inside): '
            f'{summary[m][first] / summary[base][first]:.2f}x'
            for m, base in ratios if {m, base} <= set(ran)
            and summary[m].get(first) and summary[base].get(first)]
  for m, base in ratios if args.suite == 'sparse' else ():
    read = [summary.get(x, {}).get('weight_bytes_per_token') for x in (m, base)]
    if all(read):
      lines.append(
          f'{m} / {base}, byte-count ceiling: {read[1] / read[0]:.2f}x '
          f'(weights read a token: {read[1] / 2**20:.1f} against '
          f'{read[0] / 2**20:.1f} MiB; caches not counted)')
  for stream, ours in OVERHEAD:
    if {stream, ours} <= set(ran) and summary[stream]['ms_per_token_median'] \
        and summary[ours]['ms_per_token_median']:
      lines.append(
          f"trax's loop overhead, {stream}: "
          f'{summary[stream]["ms_per_token_median"] - summary[ours]["ms_per_token_median"]:.2f}'
          ' ms/token')
  if lines:
    print('\n' + '\n'.join(lines))
  for m in ran:
    if run := _median_run(runs, m, 'profile'):
      print(harness.per_unit_table(m, run['profile']))
  for m, reason in skipped.items():
    print(f'\n{m}: skipped, {reason}')
  for m, reason in failed.items():
    print(f'\n{m}: FAILED, {reason}')
  if args.json:
    harness.write_json(args.json, benchmark='sample_speed', suite=args.suite,
                       config=cfg, models=models, summary=summary, runs=runs,
                       skipped=skipped, failed=failed)
  plot = harness.plot_path(args)
  if plot and any(_parse_model(m)[1] for m in ran):
    harness.write_plot(functools.partial(_plot, runs, ran, cfg), plot)
  return 1 if failed or not any(r['status'] == 'ok' for r in runs) else 0


def main(argv=None):
  return harness.main(_parser(), _worker, _parent, argv)


if __name__ == '__main__':
  sys.exit(main())
