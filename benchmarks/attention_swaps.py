"""Attention swaps: one small Hourglass, each attention / sparsity variant, same wall time.

Issue 4's measurement. Every variant of a small `trax_hourglass.HourglassLM`
trains for the same number of seconds on the same real text, from the same
seed, on the same batches, and is then scored on the same held-out bytes:

  relative    the default, `RelativeAttentionWrapper` (Transformer-XL style)
  rotary      `trax_hourglass.layers.RotaryCausalAttention`
  softmax     `tl.CausalAttention` (absolute positions added at the embedding)
  lsh         `tl.PureLSHSelfAttentionWrapper` (rotary positions, chunk_len 64,
              2 hashes, one chunk back), as in gin/enwik8_hourglass_lsh.gin;
              if it fails, `tl.LSHSelfAttention` is run in its place and the
              table says so
  performer   `tl.CausalFavor` (absolute positions at the embedding)
  sparse_qkv  `MultiplicativeConvCausalAttention`, sparsity = n_heads,
              length_kernel_size 3
  sparse_ff   relative attention with ff_sparsity 32 and loss_sparsity 4
  sfd         relative attention, shorten_factor_dropout (2, 3) on the '@3'
              level, attention_upsampling_fn NaiveUpsampling; scored at factor
              3, and again at factor 2 (same weights, hierarchy '..@2..')

Reference configuration (the defaults): d_model 128, d_ff 512, 4 heads,
hierarchy '2@1 4@3 2@1', dropout 0, sequences of 384 bytes, batch 8, Adam
(b2 0.98, eps 1e-9, no weight decay) at 1e-3 after a linear warmup of 100
steps, 240 s of training per variant. Variants without positions of their own
(softmax, performer, sparse_qkv) get trax's `PositionalEncoding` at the
embedding, a trainable seq_len x d_model table, counted in their params.

Data: any byte file (`--data`, e.g. the shared enwik8 head), split as
`trax_hourglass.data.text.byte_file_inputs` splits it: bytes [0, 90%) train,
[90%, 95%) validation. Training batches are that pipeline's (random windows of
the train split, a function of the seed and the step, so every variant sees the
same batches in the same order). Validation bits per byte is the mean
cross-entropy, in bits, of every byte of a fixed set of `--eval_batches`
batches of consecutive windows from the start of the validation split (each
window scored on its own, so its first bytes have little context), computed by
an eval-mode copy of the model.

Clock: each variant runs in its own fresh worker process (as in
train_speed.py); the worker builds a real `trax.supervised.training.Loop`, runs
the 2 steps that compile the training step (trax compiles it twice; their time
is reported as "compile s", their steps count in "steps"), then trains in
chunks of steps until `--seconds` of training time have passed. Evaluations
(`--eval_points` of them, evenly spaced in training time, plus one before the
timed training) are not on the training clock. Tokens/s is the timed steps'
tokens over the timed training seconds ("train s": --seconds, give or take
a step); peak RSS is the worker process's.

On a shared machine a wall-time budget measures the machine as much as the
model: each worker records the load average before and after, and the report
prints them. Run it on an otherwise idle machine.

Reproduce (from the repository root; each variant takes --seconds plus 1-2
minutes of import, compilation and evaluation, so about 50 minutes in all on a
2-core CPU):

  /work/venv/bin/python benchmarks/attention_swaps.py \
      --data ../shared/data/enwik8-head.xml --out /tmp/attention_swaps

Quick smoke run (tiny sizes, ~10 s per variant, XLA optimization off; its
numbers mean nothing; used by tests/test_benchmark_swaps.py):

  /work/venv/bin/python benchmarks/attention_swaps.py --quick \
      --data SMALL_TEXT_FILE --variants relative,sfd --out /tmp/swaps_quick
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

ALL_VARIANTS = ('relative', 'rotary', 'softmax', 'lsh', 'performer',
                'sparse_qkv', 'sparse_ff', 'sfd')
# Run in place of 'lsh' when the PureLSHSelfAttentionWrapper worker fails.
LSH_FALLBACK = 'lsh_fallback'

REFERENCE = dict(vocab_size=256, d_model=128, d_ff=512, n_heads=4,
                 hierarchy='2@1 4@3 2@1', dropout=0.0, seq_len=384, batch=8,
                 learning_rate=1e-3, warmup_steps=100, seconds=240.,
                 eval_points=8, eval_batches=16, lsh_chunk_len=64,
                 ff_sparsity=32, loss_sparsity=4, fast_compile=False)
# Tiny sizes that compile in seconds. lsh_chunk_len 16: LSH needs 2 * length a
# multiple of the chunk at every level (96 and 32 here).
QUICK = dict(REFERENCE, d_model=32, d_ff=64, n_heads=2,
             hierarchy='1@1 1@3 1@1', seq_len=48, batch=2, warmup_steps=10,
             seconds=10., eval_points=2, eval_batches=2, lsh_chunk_len=16,
             fast_compile=True)
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0',)
COMPILE_STEPS = 2  # trax compiles the training step on steps 1 and 2.
MAX_CHUNK_S = 5.0  # Longest run of steps between two looks at the clock.


def _never(step):
  del step
  return False


def _shortened_levels(hierarchy):
  """[(index, n_layers, factor)] of the shortened levels in 'n@k ...' notation."""
  levels = []
  for i, token in enumerate(hierarchy.split()):
    n, _, k = token.partition('@')
    if n.isdigit() and k.isdigit() and int(k) > 1:
      levels.append((i, int(n), int(k)))
  return levels


def _sfd_hierarchies(hierarchy):
  """(factor k of the single shortened level, the hierarchy with k -> 2)."""
  levels = _shortened_levels(hierarchy)
  if len(levels) != 1 or levels[0][2] == 2:
    raise SystemExit(
        f'sfd needs --hierarchy with exactly one shortened level whose factor '
        f'is not 2 (e.g. \'2@1 4@3 2@1\'), got {hierarchy!r}.')
  (index, n_layers, factor), = levels
  tokens = hierarchy.split()
  tokens[index] = f'{n_layers}@2'
  return factor, ' '.join(tokens)


def describe(variant, cfg):
  """The variant's HourglassLM bindings, gin-like (also the table's legend)."""
  both = 'vanilla_attn_type = middle_attn_type = '
  if variant == 'relative':
    return both + '@trax_hourglass.RelativeAttentionWrapper (the default)'
  if variant == 'rotary':
    return both + '@trax_hourglass.RotaryCausalAttention'
  if variant == 'softmax':
    return (both + '@trax.layers.CausalAttention (+ absolute positions at the '
            'embedding)')
  if variant == 'lsh':
    return (both + '@trax.layers.PureLSHSelfAttentionWrapper; '
            'PureLSHSelfAttentionWrapper.pure_lsh_implementation = '
            '@PureLSHSelfAttention, .rotary_position_emb = True, .bias = True, '
            ".num_weights = 2, .weights_format = 'model'; PureLSHSelfAttention."
            f'chunk_len = {cfg["lsh_chunk_len"]}, .n_hashes = 2, '
            '.n_buckets = None, .n_chunks_before = 1, .n_chunks_after = 0')
  if variant == LSH_FALLBACK:
    return (both + '@trax.layers.LSHSelfAttention; LSHSelfAttention.chunk_len '
            f'= {cfg["lsh_chunk_len"]}, .n_hashes = 2, .n_chunks_before = 1, '
            '.n_chunks_after = 0 (+ absolute positions at the embedding)')
  if variant == 'performer':
    return (both + '@trax.layers.CausalFavor (+ absolute positions at the '
            'embedding)')
  if variant == 'sparse_qkv':
    return (both + '@trax.layers.MultiplicativeConvCausalAttention; '
            f'MultiplicativeConvCausalAttention.sparsity = {cfg["n_heads"]}, '
            '.length_kernel_size = 3')
  if variant == 'sparse_ff':
    return (f'ff_sparsity = {cfg["ff_sparsity"]}, loss_sparsity = '
            f'{cfg["loss_sparsity"]} (relative attention)')
  if variant == 'sfd':
    factor, at_two = _sfd_hierarchies(cfg['hierarchy'])
    return (f'shorten_factor_dropout = (2, {factor}), attention_upsampling_fn '
            '= @trax_hourglass.NaiveUpsampling (relative attention); scored '
            f'at factor {factor}, and as sfd@2 with the same weights in '
            f'hierarchy {at_two!r}')
  raise ValueError(f'Unknown variant {variant!r}')


# ------------------------------------------------------------------- worker --


def _model_kwargs(variant, cfg):
  """HourglassLM keyword arguments of `variant` (imports trax: workers only)."""
  import functools  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers.research import sparsity  # pylint: disable=g-import-not-at-top
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  kwargs = dict(vocab_size=cfg['vocab_size'], d_model=cfg['d_model'],
                d_ff=cfg['d_ff'], n_heads=cfg['n_heads'],
                hierarchy=cfg['hierarchy'], dropout=cfg['dropout'],
                # Only the positions used: softmax, performer, sparse_qkv and
                # plain LSH add a (trainable) table of max_len x d_model
                # absolute positions at the embedding, counted in params.
                max_len=cfg['seq_len'])
  attention = {
      'relative': None,
      'sparse_ff': None,
      'sfd': None,
      'rotary': L.RotaryCausalAttention,
      'softmax': tl.CausalAttention,
      'lsh': functools.partial(
          tl.PureLSHSelfAttentionWrapper,
          pure_lsh_implementation=tl.PureLSHSelfAttention,
          rotary_position_emb=True, bias=True, num_weights=2,
          weights_format='model', chunk_len=cfg['lsh_chunk_len'], n_hashes=2,
          n_buckets=None, n_chunks_before=1, n_chunks_after=0),
      LSH_FALLBACK: functools.partial(
          tl.LSHSelfAttention, chunk_len=cfg['lsh_chunk_len'], n_hashes=2,
          n_buckets=None, n_chunks_before=1, n_chunks_after=0),
      'performer': tl.CausalFavor,
      'sparse_qkv': functools.partial(
          sparsity.MultiplicativeConvCausalAttention,
          sparsity=cfg['n_heads'], length_kernel_size=3),
  }[variant]
  if attention is not None:
    kwargs.update(vanilla_attn_type=attention, middle_attn_type=attention)
  if variant == 'sparse_ff':
    kwargs.update(ff_sparsity=cfg['ff_sparsity'],
                  loss_sparsity=cfg['loss_sparsity'])
  if variant == 'sfd':
    factor, _ = _sfd_hierarchies(cfg['hierarchy'])
    kwargs.update(shorten_factor_dropout=(2, factor),
                  attention_upsampling_fn=L.NaiveUpsampling)
  return kwargs


class _Evaluator:
  """Validation bits/byte of a weight tree, on a fixed list of batches."""

  def __init__(self, model_fn, batches, seq_len):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from trax import shapes  # pylint: disable=g-import-not-at-top
    self._batches = batches
    model = model_fn(mode='eval')
    model.init(shapes.ShapeDtype((batches[0].shape[0], seq_len), np.int32))
    self._state = model.state
    rng = jax.random.PRNGKey(_common.SEED)  # Unused in eval mode (no dropout).

    def nll(weights, state, tokens):
      logits, _ = model.pure_fn(tokens, weights, state, rng)
      logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
      return -jax.numpy.take_along_axis(logp, tokens[..., None], -1).sum()

    self._nll = jax.jit(nll)
    self.model = model

  def __call__(self, weights):
    total = sum(float(self._nll(weights, self._state, x))
                for x in self._batches)
    n_bytes = sum(x.size for x in self._batches)
    return total / (n_bytes * math.log(2.))


def _worker(variant, cfg):
  """Trains one variant in this (fresh) process; prints one result line."""
  record = dict(variant=variant, status='ok', pid=os.getpid(),
                load_before=os.getloadavg())
  start = time.perf_counter()
  try:
    trax = _common.import_trax('ours')
  except _common.ModelUnavailable as e:
    record.update(status='unavailable', reason=str(e))
    _common.emit_result(record)
    return 0
  record['import_s'] = time.perf_counter() - start

  try:
    import functools  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from trax import layers as tl  # pylint: disable=g-import-not-at-top
    from trax.supervised import training  # pylint: disable=g-import-not-at-top
    from trax_hourglass import HourglassLM  # pylint: disable=g-import-not-at-top
    from trax_hourglass.data import text  # pylint: disable=g-import-not-at-top
    np.random.seed(_common.SEED)

    # Data: the byte-file pipeline's splits and training batches.
    data = text.load_bytes(cfg['data'])
    bounds = text.byte_file_splits(len(data))
    inputs = text.byte_file_inputs(
        cfg['data'], batch_size=cfg['batch'], sequence_length=cfg['seq_len'],
        seed=_common.SEED)
    valid = data[slice(*bounds['valid'])]
    if len(valid) < cfg['seq_len']:
      raise ValueError(f'{cfg["data"]}: the validation split has {len(valid)} '
                       f'bytes, fewer than --seq_len {cfg["seq_len"]}.')
    eval_fn = text.eval_batches(valid, cfg['batch'], cfg['seq_len'])
    eval_batches = [eval_fn(i)[0] for i in range(cfg['eval_batches'])]
    n_windows = len(valid) // cfg['seq_len']
    record.update(
        data_bytes=len(data), train_bytes=bounds['train'][1],
        valid_bytes=len(valid), valid_windows=n_windows,
        eval_bytes=cfg['eval_batches'] * cfg['batch'] * cfg['seq_len'],
        eval_wraps=cfg['eval_batches'] * cfg['batch'] > n_windows)

    kwargs = _model_kwargs(variant, cfg)
    model_fn = functools.partial(HourglassLM, **kwargs)
    start = time.perf_counter()
    task = training.TrainTask(
        labeled_data=inputs.train_stream(1),
        loss_layer=tl.WeightedCategoryCrossEntropy(),
        optimizer=trax.optimizers.Adam(cfg['learning_rate'],
                                       weight_decay_rate=0.0, b1=0.9, b2=0.98,
                                       eps=1e-9),
        lr_schedule=trax.lr.multifactor(
            constant=cfg['learning_rate'], factors='constant * linear_warmup',
            warmup_steps=cfg['warmup_steps']))
    loop = training.Loop(model_fn(mode='train'), [task], output_dir=None,
                         checkpoint_at=_never, permanent_checkpoint_at=_never,
                         eval_at=_never, n_devices=1,
                         random_seed=_common.SEED)
    _common.block(loop.model.weights)
    record['init_s'] = time.perf_counter() - start
    record['n_params'] = _common.count_params(loop.model.weights)
    evaluate = _Evaluator(model_fn, eval_batches, cfg['seq_len'])

    # Untimed: the steps that compile the training step.
    start = time.perf_counter()
    loop.run(COMPILE_STEPS)
    _common.block((loop.model.weights, loop.model.state))
    record['compile_s'] = time.perf_counter() - start
    log = lambda msg: print(f'[{variant}] {msg}', file=sys.stderr, flush=True)

    curve, eval_s = [], 0.

    def eval_point(train_s, timed_steps):
      nonlocal eval_s
      t = time.perf_counter()
      bpb = evaluate(loop.model.weights)
      eval_s += time.perf_counter() - t
      curve.append(dict(train_s=train_s, step=loop.step, bits_per_byte=bpb,
                        tokens=loop.step * cfg['batch'] * cfg['seq_len'],
                        timed_steps=timed_steps))
      log(f'{train_s:7.1f} s, step {loop.step:6d}: {bpb:.4f} bits/byte')
      if not math.isfinite(bpb):
        raise FloatingPointError(f'validation loss is {bpb} at step '
                                 f'{loop.step}')

    t = time.perf_counter()
    eval_point(0., 0)
    record['first_eval_s'] = time.perf_counter() - t  # Includes its compile.
    budget = cfg['seconds']
    targets = [budget * (i + 1) / cfg['eval_points']
               for i in range(cfg['eval_points'])]
    train_s, timed_steps, step_s = 0., 0, None
    for target in targets:
      while True:
        remaining = target - train_s
        if step_s is None:  # First timed chunk: one step, to learn its cost.
          n = 1
        elif remaining < 2 * step_s:  # Stop within half a step of the target.
          n = int(remaining / step_s + 0.5)
        else:  # At most half the time left: a slowdown cannot overshoot much.
          n = max(1, int(min(MAX_CHUNK_S, remaining / 2) / step_s))
        if n < 1 or remaining <= 0:
          break
        t = time.perf_counter()
        loop.run(n)
        _common.block((loop.model.weights, loop.model.state))
        elapsed = time.perf_counter() - t
        train_s += elapsed
        timed_steps += n
        step_s = elapsed / n
      eval_point(train_s, timed_steps)

    if variant == 'sfd':
      _, at_two = _sfd_hierarchies(cfg['hierarchy'])
      kwargs_two = dict(kwargs, hierarchy=at_two, shorten_factor_dropout=())
      at_two_eval = _Evaluator(functools.partial(HourglassLM, **kwargs_two),
                               eval_batches, cfg['seq_len'])
      t = time.perf_counter()
      record['bits_per_byte_at_2'] = at_two_eval(loop.model.weights)
      record['eval_at_2_s'] = time.perf_counter() - t
      record['hierarchy_at_2'] = at_two
      log(f'at factor 2 ({at_two!r}): {record["bits_per_byte_at_2"]:.4f} '
          'bits/byte')
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    record.update(status='error', reason=f'{type(e).__name__}: {e}'[:2000])
    _common.emit_result(record)
    return 1

  record.update(
      curve=curve, bits_per_byte=curve[-1]['bits_per_byte'], train_s=train_s,
      steps=loop.step, timed_steps=timed_steps,
      tokens_per_s=timed_steps * cfg['batch'] * cfg['seq_len'] / train_s,
      step_ms=1000. * train_s / timed_steps, eval_s=eval_s,
      self_peak_rss_mib=_common.self_peak_rss_mib(),
      load_after=os.getloadavg(), **_common.device_summary())
  _common.emit_result(record)
  return 0


# ------------------------------------------------------------------- parent --


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', metavar='PATH',
                      help='Byte file to train and validate on (required), '
                      'e.g. ../shared/data/enwik8-head.xml.')
  parser.add_argument('--variants', default=','.join(ALL_VARIANTS),
                      help='Comma-separated subset of %(default)s.')
  parser.add_argument('--quick', action='store_true',
                      help='Smoke test: tiny sizes, ~10 s per variant, XLA '
                      'optimization off; explicit flags below still override.')
  parser.add_argument('--out', metavar='DIR',
                      help='Write attention_swaps.json and attention_swaps.png '
                      '(bits/byte vs training time) here.')
  # None = "take it from the reference (or --quick) configuration".
  for name, type_ in [('seconds', float), ('seq_len', int), ('batch', int),
                      ('d_model', int), ('d_ff', int), ('n_heads', int),
                      ('hierarchy', str), ('dropout', float),
                      ('learning_rate', float), ('warmup_steps', int),
                      ('eval_points', int), ('eval_batches', int),
                      ('lsh_chunk_len', int)]:
    parser.add_argument(f'--{name}', type=type_, default=None,
                        help=f'Default {REFERENCE[name]!r} '
                        f'({QUICK[name]!r} with --quick).')
  parser.add_argument('--worker_timeout', type=float, default=None,
                      help='Seconds before a worker is killed (default '
                      '2 * --seconds + 1200).')
  # Internal: run one variant in this process (spawned by the parent).
  parser.add_argument('--_worker', metavar='VARIANT', help=argparse.SUPPRESS)
  parser.add_argument('--_config', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _resolve_config(args, variants):
  cfg = dict(QUICK if args.quick else REFERENCE)
  for name in cfg:
    value = getattr(args, name, None)
    if value is not None:
      cfg[name] = value
  if not args.data:
    raise SystemExit('--data PATH is required: a byte file to train on, e.g. '
                     '../shared/data/enwik8-head.xml.')
  if not os.path.isfile(args.data):
    raise SystemExit(f'--data {args.data}: no such file.')
  cfg['data'] = os.path.abspath(args.data)
  if cfg['seconds'] <= 0 or cfg['eval_points'] < 1 or cfg['eval_batches'] < 1:
    raise SystemExit('--seconds, --eval_points and --eval_batches must be '
                     'positive.')
  multiple = _common.max_shorten_factor(cfg['hierarchy']) or 1
  if 'sfd' in variants:
    factor, _ = _sfd_hierarchies(cfg['hierarchy'])
    multiple = math.lcm(multiple, factor, 2)
  if cfg['seq_len'] % multiple:
    raise SystemExit(f'--seq_len {cfg["seq_len"]} must be divisible by '
                     f'{multiple} (the hierarchy\'s shortening'
                     + (', and 2 for sfd' if 'sfd' in variants else '') + ').')
  if 'lsh' in variants:
    levels = [cfg['seq_len']] + [cfg['seq_len'] // k for _, _, k in
                                 _shortened_levels(cfg['hierarchy'])]
    bad = [n for n in levels if (2 * n) % cfg['lsh_chunk_len']]
    if bad:
      raise SystemExit(
          f'lsh: 2 * length must be a multiple of --lsh_chunk_len '
          f'{cfg["lsh_chunk_len"]} at every level; lengths {levels}.')
  n_bytes = os.path.getsize(cfg['data'])
  valid = math.floor(0.95 * n_bytes) - math.floor(0.9 * n_bytes)
  if valid < cfg['seq_len'] or math.floor(0.9 * n_bytes) < cfg['seq_len']:
    raise SystemExit(f'--data {args.data}: {n_bytes:,} bytes is too small for '
                     f'--seq_len {cfg["seq_len"]} (5% of it is validation).')
  return cfg


def _command_line(argv):
  script = os.path.relpath(os.path.abspath(__file__), _common.REPO_ROOT)
  return ' '.join(shlex.quote(a) for a in ['python', script] + list(argv))


def _table(variants, results):
  headers = ['variant', 'params', 'valid bits/byte', 'train tokens/s',
             'steps', 'train s', 'peak RSS MiB', 'compile s']
  rows = []
  for v in variants:
    r = results[v]
    name = v if r['variant'] == v else f'{v} ({r["variant"]})'
    if r['status'] != 'ok':
      rows.append([name, _common.fmt(r.get('n_params'), ','), 'FAILED',
                   'n/a', 'n/a', 'n/a', _common.fmt(r.get('peak_rss_mib')),
                   'n/a'])
      continue
    rows.append([name, _common.fmt(r['n_params'], ','),
                 _common.fmt(r['bits_per_byte'], '.3f'),
                 _common.fmt(r['tokens_per_s']),
                 _common.fmt(r['steps'], ','),
                 _common.fmt(r['train_s'], '.0f'),
                 _common.fmt(r['peak_rss_mib']),
                 _common.fmt(r['compile_s'], '.0f')])
    if 'bits_per_byte_at_2' in r:
      rows.append([f'{v}@2', _common.fmt(r['n_params'], ','),
                   _common.fmt(r['bits_per_byte_at_2'], '.3f'),
                   'same run', 'same run', 'same run', 'same run',
                   'same run'])
  return _common.markdown_table(headers, rows)


def _plot(variants, results, cfg, path):
  """bits/byte vs training seconds, one line per variant; False if no matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  for v in variants:
    r = results[v]
    if r['status'] != 'ok':
      continue
    points = [p for p in r['curve'] if p['timed_steps'] > 0]
    label = v if r['variant'] == v else f'{v} ({r["variant"]})'
    line, = ax.plot([p['train_s'] for p in points],
                    [p['bits_per_byte'] for p in points], marker='o',
                    markersize=3, label=label)
    if 'bits_per_byte_at_2' in r:
      ax.plot([points[-1]['train_s']], [r['bits_per_byte_at_2']], marker='*',
              markersize=10, linestyle='none', color=line.get_color(),
              label=f'{v} evaluated at factor 2')
  ax.set_xlabel('training time (s, compilation and evaluation excluded)')
  ax.set_ylabel('validation bits/byte')
  ax.set_title(f'Hourglass {cfg["hierarchy"]!r}, d_model {cfg["d_model"]}, '
               f'{cfg["batch"]} x {cfg["seq_len"]} bytes/step, '
               f'{os.path.basename(cfg["data"])}', fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _run_variant(variant, cfg, timeout_s, log):
  argv = [sys.executable, os.path.abspath(__file__), '--_worker', variant,
          '--_config', json.dumps(cfg)]
  proc = _common.run_worker(
      argv, timeout_s,
      xla_flags=FAST_COMPILE_XLA_FLAGS if cfg['fast_compile'] else ())
  record = _common.parse_result(proc['stdout']) or dict(
      variant=variant, status='error',
      reason='timed out' if proc['timed_out'] else
      f'worker exited {proc["returncode"]} without a result')
  record.update(peak_rss_mib=proc['peak_rss_mib'],
                worker_wall_s=proc['wall_s'], returncode=proc['returncode'])
  if record['status'] == 'ok':
    at_two = (f', at factor 2 {record["bits_per_byte_at_2"]:.4f}'
              if 'bits_per_byte_at_2' in record else '')
    log(f'{variant}: {record["bits_per_byte"]:.4f} bits/byte{at_two}, '
        f'{record["tokens_per_s"]:,.0f} tokens/s, {record["steps"]} steps, '
        f'peak RSS {record["peak_rss_mib"]:,.0f} MiB, compile '
        f'{record["compile_s"]:.1f} s, process {proc["wall_s"]:.1f} s')
  else:
    log(f'{variant}: FAILED: {record["reason"]}\n{_common.tail(proc["stderr"])}')
  return record


def _parent(args, argv):
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = sorted(set(variants) - set(ALL_VARIANTS))
  if unknown or not variants:
    raise SystemExit(f'Unknown --variants {unknown}; choose from '
                     f'{",".join(ALL_VARIANTS)}.')
  cfg = _resolve_config(args, variants)
  timeout_s = args.worker_timeout or 2 * cfg['seconds'] + 1200
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  start = time.perf_counter()

  results, failed = {}, {}
  for v in variants:
    record = _run_variant(v, cfg, timeout_s, log)
    if v == 'lsh' and record['status'] == 'error':
      log('lsh: PureLSHSelfAttentionWrapper failed; running LSHSelfAttention.')
      record = dict(_run_variant(LSH_FALLBACK, cfg, timeout_s, log),
                    wrapper_error=record['reason'])
    if record['status'] != 'ok':
      failed[v if record['variant'] == v else record['variant']] = (
          record['reason'])
    results[v] = record

  ok = [results[v] for v in variants if results[v]['status'] == 'ok']
  print(f'Attention swaps: each variant trained {cfg["seconds"]:g} s '
        f'(compilation and evaluation excluded) on '
        f'{os.path.basename(cfg["data"])}'
        + (f' ({ok[0]["data_bytes"]:,} bytes; train = first '
           f'{ok[0]["train_bytes"]:,}, validation = next '
           f'{ok[0]["valid_bytes"]:,}, scored on the first '
           f'{ok[0]["eval_bytes"]:,}'
           + (' [wrapping]' if ok[0]['eval_wraps'] else '') + ')'
           if ok else '')
        + f', HourglassLM d_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, '
        f'{cfg["n_heads"]} heads, hierarchy {cfg["hierarchy"]!r}, dropout '
        f'{cfg["dropout"]:g}, {cfg["batch"]} x {cfg["seq_len"]} bytes/step, '
        f'Adam {cfg["learning_rate"]:g} after {cfg["warmup_steps"]} warmup '
        f'steps, seed {_common.SEED}'
        + (f', on {ok[0]["backend"]} ({ok[0]["device_kind"]})' if ok else '')
        + (' [--quick: XLA optimization off, smoke test only, not a '
           'measurement]' if cfg['fast_compile'] else '') + ':\n')
  print(_table(variants, results))
  print()
  for v in variants:
    r = results[v]
    print(f'- {v}: {describe(r["variant"], cfg)}'
          + (f'; run in place of PureLSHSelfAttentionWrapper, which failed: '
             f'{r["wrapper_error"]}' if 'wrapper_error' in r else ''))
  loads = [(r['load_before'][0], r['load_after'][0]) for r in ok]
  if loads:
    print(f'\n1-min load average before/after each variant: '
          + ', '.join(f'{v} {a:.1f}/{b:.1f}' for v, (a, b) in zip(
              [v for v in variants if results[v]['status'] == 'ok'], loads))
          + f' ({os.cpu_count()} CPUs).')
  for name, reason in failed.items():
    print(f'\n{name}: FAILED, {reason}')
  print(f'\nCommand: {_command_line(argv)}')
  log(f'total {time.perf_counter() - start:.0f} s')

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, 'attention_swaps.json')
    with open(json_path, 'w') as f:
      json.dump(dict(benchmark='attention_swaps', command=_command_line(argv),
                     config=cfg, variants=variants, results=results,
                     descriptions={v: describe(results[v]['variant'], cfg)
                                   for v in variants},
                     failed=failed), f, indent=2, sort_keys=True)
    png_path = os.path.join(args.out, 'attention_swaps.png')
    if _plot(variants, results, cfg, png_path):
      print(f'Wrote {json_path} and {png_path}.')
    else:
      print(f'Wrote {json_path}; no plot: matplotlib is not installed.')
  return 1 if failed or not ok else 0


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = _parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    return _worker(args._worker, json.loads(args._config))  # pylint: disable=protected-access
  return _parent(args, argv)


if __name__ == '__main__':
  sys.exit(main())
