"""Equal training time: which model reaches the lowest bits per byte?

The paper's claim in miniature ("at the same compute, Hourglass beats the
Transformer"), its ablations, and the attention swaps, all measured the same
way: every variant trains for the same wall time, from the same seed, on the
same batches of the same real text, and is scored on the same held-out bytes.

Suites (`--suite`, or any mix with `--variants`):

  claim       hourglass     HourglassLM '2@1 4@3 2@1', relative attention,
                            attention resampling (the default model)
              vanilla       the same 8 relative-attention blocks, no
                            shortening ('8@1'): differs in the shortening only
              transformer6  trax TransformerLM, 6 layers, same width
              transformer12 trax TransformerLM, 12 layers, same width
  ablations   hourglass and, changing one thing each:
              <shorten>_<upsample> for shortening avg (average pooling),
                            linear (linear pooling), attn (attention pooling,
                            the default) x upsampling repeat, linear, attn
                            (the default): avg_repeat ... attn_linear
              factor2, factor4  shortening by 2 or 4 instead of 3
              no_shift      without the k-1 shift before shortening: the
                            model sees the future (see "leak" below)
  swaps       hourglass (relative attention) and rotary, softmax, lsh,
              performer, sparse_qkv (attention swaps), sparse_ff (sparse
              feed-forward + loss), sfd (shorten-factor dropout (2, 3); also
              scored at factor 2 with the same weights, row "sfd@2")
  boundaries  fixed, whitespace, entropy, gumbel, unigram: dynamic pooling
              (HourglassLM's `boundaries`) against fixed pooling every k
              bytes, same layers; k matches the whitespace segments of the
              training split. Also the average shortening each achieved;
              benchmarks/boundaries.py draws their boundaries (its
              docstring has the details).
The paper's claims at its lengths, each with its own configuration
(SUITE_CONFIG; flags still override it):
  length      hourglass '2@1 8@3 2@1', vanilla ('12@1'), transformer12 at
              2,046 bytes per window (2,048 rounded to a multiple of 2 and 3)
  params      hourglass and same_params: the same blocks flat, as many as
              give the nearest parameter count (the worker counts), at
              equal steps (`--steps`)
  sfd         the slides' Table 4: sfd, fixed2, fixed3 (the same model with
              shorten factor 2 or 3 and no dropout), each also scored at the
              other factor with the same weights, at equal steps
  images      hourglass '1@1 8@3 1@1', vanilla ('10@1'), transformer10 on an
              .npz of images (`--data`, e.g. the CIFAR-10 head: 3,072 tokens);
              bits per dimension, and with --out a grid of the best model's
              completions (completions.png: top halves given, bottoms sampled
              with `trax_hourglass.decoding`)

Reference configuration (the defaults): d_model 128, d_ff 512, 4 heads,
hierarchy '2@1 4@3 2@1', dropout 0, 16 x 384 bytes per step, Adam (b2 0.98,
eps 1e-9) at 1e-3 after 100 linear warmup steps, 240 s of training each.
TransformerLM keeps its own choices (absolute positions, ReLU); attentions
without positions of their own get trax's `PositionalEncoding` at the embedding.

Data: any byte file (`--data`), split 90/5/5 by
`trax_hourglass.data.text.byte_file_splits`; or an .npz of uint8 images
(`train_images`, `test_images` [N, H, W, C]): the last 5% of the train images
validate, the test images test, an image is H * W * C tokens (bits per byte
are then bits per dimension). Training batches are random windows of the
train split (random images), the same for every variant. Bits per byte: on
`--eval_batches` validation batches during training (the plot), at the end on
every whole window of the test split (the table). Leak: at the end
`--probe_positions` positions of the first 2 test batches are scored again
with that byte and all later ones replaced by 0; a causal model scores the
same (leak 0), a model that peeks (no_shift) scores worse without the future.

Clock: each variant trains in its own worker process; the step that compiles
is untimed, then chunks of steps run until `--seconds` of training time have
passed; evaluations are off the clock. `--clock wall` (the default) counts
wall seconds, with XLA using every core: run it on an otherwise idle machine.
`--clock cpu` counts the worker's CPU seconds (`time.process_time`) with XLA
computing on one thread: the work a model does, not the time others take from
it, so it stays fair on a shared machine (not entirely: cache and memory
bandwidth are shared too). Each worker records which clock, both kinds of
seconds, and the load average before and after. `--jobs N` trains N variants
at once (`--clock cpu` only). `--steps N` trains each variant N steps
instead (equal steps: the params and sfd suites).

Reproduce (each variant takes --seconds plus 1-2 minutes):

  python benchmarks/equal_time.py --suite claim \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/claim
  python benchmarks/equal_time.py --suite ablations --seconds 120 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/ablations
  python benchmarks/equal_time.py --suite swaps --seconds 60 --batch 8 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/swaps
  python benchmarks/equal_time.py --suite boundaries --clock cpu --jobs 4 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/boundaries
  python benchmarks/equal_time.py --suite length --clock cpu --jobs 3 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/length
  python benchmarks/equal_time.py --suite params --clock cpu --jobs 2 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/params
  python benchmarks/equal_time.py --suite sfd --clock cpu --jobs 3 \
      --data ../shared/data/enwik8-head.xml --out benchmarks/results/sfd
  python benchmarks/equal_time.py --suite images --clock cpu --jobs 3 \
      --data ../shared/data/cifar10-head.npz --out benchmarks/results/images

Quick smoke run (tiny sizes, XLA optimization off; numbers mean nothing):

  python benchmarks/equal_time.py --quick --data SMALL_TEXT_FILE \
      --variants hourglass,no_shift --out /tmp/equal_time_quick
"""

import concurrent.futures
import functools
import math
import os
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import boundaries  # pylint: disable=g-import-not-at-top,wrong-import-position

SHORTENING = {'avg': 'AveragePooling', 'linear': 'LinearPooling',
              'attn': 'AttentionResampling'}
UPSAMPLING = {'repeat': 'NaiveUpsampling', 'linear': 'LinearUpsampling',
              'attn': 'AttentionResampling'}
RESAMPLING = tuple(f'{s}_{u}' for s in SHORTENING for u in UPSAMPLING
                   if (s, u) != ('attn', 'attn'))  # attn_attn is `hourglass`.
FIXED = ('fixed2', 'fixed3')  # sfd's model at one shorten factor, no dropout.
SWAPS = ('rotary', 'softmax', 'lsh', 'performer', 'sparse_qkv', 'sparse_ff',
         'sfd')
SUITES = {
    'claim': ('hourglass', 'vanilla', 'transformer6', 'transformer12'),
    # The paper's claims at its lengths, with their own configs (SUITE_CONFIG).
    'length': ('hourglass', 'vanilla', 'transformer12'),
    'params': ('hourglass', 'same_params'),
    'sfd': ('sfd',) + FIXED,
    'images': ('hourglass', 'vanilla', 'transformer10'),
    'ablations': ('hourglass',) + RESAMPLING + ('factor2', 'factor4',
                                                'no_shift'),
    'swaps': ('hourglass',) + SWAPS,
    'boundaries': boundaries.KINDS,
}
ALL_VARIANTS = tuple(dict.fromkeys(v for vs in SUITES.values() for v in vs))
# Run in place of 'lsh' when the PureLSHSelfAttentionWrapper worker fails.
LSH_FALLBACK = 'lsh_fallback'

REFERENCE = dict(vocab_size=256, d_model=128, d_ff=512, n_heads=4,
                 hierarchy='2@1 4@3 2@1', dropout=0.0, seq_len=384, batch=16,
                 learning_rate=1e-3, warmup_steps=100, seconds=240.,
                 eval_points=8, eval_batches=8, test_batches=0,
                 probe_positions=16, lsh_chunk_len=64, ff_sparsity=32,
                 loss_sparsity=4, fast_compile=False, clock='wall', steps=0)
# Tiny sizes that compile in seconds. lsh_chunk_len 16: LSH needs 2 * length a
# multiple of the chunk at every level (96 and 32 here).
QUICK = dict(REFERENCE, d_model=32, d_ff=64, n_heads=2,
             hierarchy='1@1 1@3 1@1', seq_len=48, batch=2, warmup_steps=10,
             seconds=10., eval_points=2, eval_batches=2, test_batches=2,
             probe_positions=4, lsh_chunk_len=16, fast_compile=True)
CLOCK_LABELS = {'wall': 'training time',
                'cpu': "training CPU time (the worker's, XLA on one thread)"}
# What a suite changes of REFERENCE (explicit flags still win; --quick is QUICK).
# 2,046: the paper's 2,048 rounded down to a multiple of the shortenings 2, 3.
SUITE_CONFIG = {
    'length': dict(hierarchy='2@1 8@3 2@1', seq_len=2046, batch=1,
                   warmup_steps=50, seconds=240., eval_batches=4,
                   test_batches=16, probe_positions=8),
    # Equal steps, shorter windows: steps cost what they cost.
    'params': dict(hierarchy='2@1 8@3 2@1', seq_len=768, batch=1,
                   warmup_steps=50, steps=150, test_batches=32),
    'sfd': dict(hierarchy='2@1 8@3 2@1', seq_len=768, batch=1,
                warmup_steps=50, steps=150, test_batches=32),
    # --data: an .npz of images, e.g. ../shared/data/cifar10-head.npz. Half
    # the width and heads: 3,072-token attention weights fit beside the rest.
    'images': dict(hierarchy='1@1 8@3 1@1', d_model=64, d_ff=256, n_heads=2,
                   batch=1, warmup_steps=50, seconds=240., eval_batches=4,
                   test_batches=16, probe_positions=8),
    # 336 = 48 x 7: k = 7 on enwik8 (6.9 bytes per whitespace segment).
    'boundaries': dict(seq_len=336),
}
# The completion grid of the images suite's best model: the first test images
# (the top row) and samples of their bottom halves, each pixel a square.
COMPLETION_IMAGES, COMPLETION_ROWS, COMPLETION_SCALE = 8, 2, 4
QUICK_STEPS = 3  # --quick --suite with an equal-steps budget.
COMPILE_STEPS = 1  # The first step compiles the training step.
MAX_CHUNK_S = 5.0  # Longest run of steps between two looks at the clock.
LEAK_BATCHES = 2  # Test batches probed for the leak (a forward per position).


def _hierarchy(hierarchy):
  """`hierarchy` parsed (`trax_hourglass.hierarchy`), or SystemExit."""
  try:
    return harness.parse_hierarchy(hierarchy)
  except ValueError as e:
    raise SystemExit(f'--hierarchy: {e}') from None


def _is_images(cfg):
  return cfg['data'].endswith('.npz')


def _load_images(path):
  """(train_images, test_images) of an .npz, each uint8 [N, H, W, C]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path, allow_pickle=False) as f:  # Nothing read runs code.
    return f['train_images'], f['test_images']


def _valid_images(n_train):
  """How many of the last train_images validate (5%, as the text splits)."""
  return max(1, n_train // 20)


def _factors(variant, cfg):
  """(factor scored at, other factors also scored at) of the shorten-factor
  dropout family (sfd, fixedK): the dropout's factors 2 and the hierarchy's;
  (None, ()) for other variants."""
  if variant not in ('sfd',) + FIXED:
    return None, ()
  own = _hierarchy(variant_hierarchy(variant, cfg)).total_factor
  both = {2, _single_level(cfg['hierarchy'], variant).total_factor}
  return own, tuple(sorted(both - {own}))


def _single_level(hierarchy, why):
  """The one shortened `Level` of `hierarchy`, or SystemExit."""
  levels = _hierarchy(hierarchy).levels
  if len(levels) != 1:
    raise SystemExit(f'{why} needs --hierarchy with exactly one shortened '
                     f"level (e.g. '2@1 4@3 2@1'), got {hierarchy!r}.")
  return levels[0]


def _with_factor(hierarchy, factor, why):
  """`hierarchy` with its one shortened level's factor replaced, '2@1 4@2 2@1'."""
  n_layers = _single_level(hierarchy, why).n_layers
  pre, post = _hierarchy(hierarchy).vanilla_layers
  return f'{pre}@1 {n_layers}@{factor} {post}@1'


def _n_layers(hierarchy):
  """Layers of a hierarchy: '2@1 4@3 2@1' has 8 (outer levels count twice)."""
  spec = _hierarchy(hierarchy)
  return sum(spec.vanilla_layers) + sum(
      level.n_layers * (1 if i == len(spec.levels) - 1 else 2)
      for i, level in enumerate(spec.levels))


def variant_hierarchy(variant, cfg):
  """The hierarchy string `variant` trains with (None: not an hourglass)."""
  if variant.startswith('transformer'):
    return None
  if variant == 'vanilla':
    return f'{_n_layers(cfg["hierarchy"])}@1'
  if variant == 'same_params':  # Its depth is chosen in the worker.
    return cfg.get('flat_layers') and f'{cfg["flat_layers"]}@1'
  if variant in ('factor2', 'factor4') + FIXED:
    return _with_factor(cfg['hierarchy'], int(variant[-1]), variant)
  if variant in boundaries.KINDS:
    return _with_factor(cfg['hierarchy'], boundaries.factor(variant, cfg),
                        variant)
  return cfg['hierarchy']


def describe(variant, cfg):
  """How `variant` differs from the default hourglass (the table's legend)."""
  both = 'vanilla_attn_type = middle_attn_type = '
  if variant == 'hourglass':
    return (f'HourglassLM hierarchy {cfg["hierarchy"]!r}, relative attention, '
            'attention pooling and upsampling (the defaults)')
  if variant == 'vanilla':
    return (f'the same relative-attention blocks, no shortening: hierarchy '
            f'{variant_hierarchy(variant, cfg)!r}')
  if variant.startswith('transformer'):
    return (f'trax.models.TransformerLM, n_layers {variant[len("transformer"):]}'
            ', same d_model/d_ff/n_heads/dropout, max_len = seq_len')
  if variant in RESAMPLING:
    shorten, up = variant.split('_')
    return (f'downsampling_fn = @trax_hourglass.{SHORTENING[shorten]}, '
            f'upsampling_fn = @trax_hourglass.{UPSAMPLING[up]}')
  if variant in ('factor2', 'factor4'):
    return f'hierarchy {variant_hierarchy(variant, cfg)!r}'
  if variant in boundaries.KINDS:
    return (f'hierarchy {variant_hierarchy(variant, cfg)!r}, ' + (
        'downsampling_fn = @trax_hourglass.AveragePooling, upsampling_fn = '
        '@trax_hourglass.NaiveUpsampling' if variant == 'fixed' else
        f"boundaries = '{variant}' (k: the target segment length)" + (
            ', sentencepiece_model = a unigram model trained on the start of '
            'the training split' if variant == 'unigram' else '')))
  if variant == 'same_params':
    return ('the same relative-attention blocks, no shortening, as many as '
            "make its parameter count nearest the hourglass's: hierarchy "
            f'{variant_hierarchy(variant, cfg) or "N@1"!r}')
  if variant in FIXED:
    factor, others = _factors(variant, cfg)
    return (f'hierarchy {variant_hierarchy(variant, cfg)!r}, '
            'attention_upsampling_fn = @trax_hourglass.NaiveUpsampling (sfd '
            f'without the dropout); scored at factor {factor}, and at '
            + ', '.join(f'{f} as {variant}@{f}' for f in others)
            + ' with the same weights')
  if variant == 'no_shift':
    return ("the shortening reads the unshifted vectors, not CausalShift's "
            '(not causal: shortened vector i sees its whole block)')
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
            f'{cfg["loss_sparsity"]}')
  if variant == 'sfd':
    factor = _single_level(cfg['hierarchy'], 'sfd').total_factor
    return (f'shorten_factor_dropout = (2, {factor}), attention_upsampling_fn '
            '= @trax_hourglass.NaiveUpsampling; scored at factor '
            f'{factor}, and as sfd@2 with the same weights in hierarchy '
            f'{_with_factor(cfg["hierarchy"], 2, "sfd")!r}')
  raise ValueError(f'Unknown variant {variant!r}')


# ------------------------------------------------------------------- worker --


def _model_fn(variant, cfg):
  """mode -> uninitialized model of `variant` (imports trax: workers only)."""
  import trax  # pylint: disable=g-import-not-at-top
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax.layers.research import sparsity  # pylint: disable=g-import-not-at-top
  import trax_hourglass  # pylint: disable=g-import-not-at-top
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  width = dict(vocab_size=cfg['vocab_size'], d_model=cfg['d_model'],
               d_ff=cfg['d_ff'], n_heads=cfg['n_heads'],
               dropout=cfg['dropout'],
               # Only the positions used: absolute position tables (trax's
               # Transformer, softmax, performer, sparse_qkv, plain LSH) are
               # seq_len x d_model, counted in params.
               max_len=cfg['seq_len'])
  if variant.startswith('transformer'):
    return functools.partial(trax.models.TransformerLM,
                             n_layers=int(variant[len('transformer'):]),
                             **width)
  kwargs = dict(width, hierarchy=variant_hierarchy(variant, cfg))
  attention = {
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
  }.get(variant)
  if attention is not None:
    kwargs.update(vanilla_attn_type=attention, middle_attn_type=attention)
  if variant in RESAMPLING:
    shorten, up = variant.split('_')
    kwargs.update(downsampling_fn=getattr(L, SHORTENING[shorten]),
                  upsampling_fn=getattr(L, UPSAMPLING[up]))
  if variant in boundaries.KINDS:
    kwargs.update(boundaries.model_kwargs(variant, cfg))
  if variant == 'sparse_ff':
    kwargs.update(ff_sparsity=cfg['ff_sparsity'],
                  loss_sparsity=cfg['loss_sparsity'])
  if variant in ('sfd',) + FIXED:
    kwargs.update(attention_upsampling_fn=L.NaiveUpsampling)
  if variant == 'sfd':
    factor = _single_level(cfg['hierarchy'], 'sfd').total_factor
    kwargs.update(shorten_factor_dropout=(2, factor))
  if variant == 'no_shift':
    kwargs.update(downsampling_fn=_UnshiftedShortening)
  return functools.partial(trax_hourglass.HourglassLM, **kwargs)


def _UnshiftedShortening(shorten_factor, max_inference_length=2048,  # pylint: disable=invalid-name
                         ff_sparsity=0, **kwargs):
  """no_shift's shortening: the default one, of the level's unshifted vectors.

  A level shortens (shifted, vecs), its input shifted right by k-1 and itself;
  this drops the shifted copy, so shortened vector i sees its whole block.
  """
  from trax import layers as tl  # pylint: disable=g-import-not-at-top
  from trax_hourglass import layers as L  # pylint: disable=g-import-not-at-top
  return [tl.Drop(), tl.Dup(),  # vecs, vecs
          L.AttentionResampling(  # short: (batch, len/k, d_model), vecs
              shorten_factor, max_inference_length=max_inference_length,
              ff_sparsity=ff_sparsity, **kwargs)]


class _Evaluator:
  """Bits/byte of a weight tree on a fixed list of batches; and the leak."""

  def __init__(self, model_fn, batches, seq_len):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from trax import shapes  # pylint: disable=g-import-not-at-top
    from trax_hourglass import scoring  # pylint: disable=g-import-not-at-top
    self._batches = batches
    model = model_fn(mode='eval')
    model.init(shapes.ShapeDtype((batches[0].shape[0], seq_len), np.int32))
    self._scorer = scoring.Scorer(model)

  def __call__(self, weights):
    bits = -sum(float(self._scorer.log2_probs(x, weights).sum())
                for x in self._batches)
    return bits / sum(x.size for x in self._batches)

  def leak(self, weights, positions):
    """(teacher-forced, future-hidden) bits/byte at `positions` of each window."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    forced, hidden = [], []
    for x in self._batches[:LEAK_BATCHES]:
      forced.append(self._scorer.log2_probs(x, weights)[:, positions])
      # Byte p scored with it and every later byte read as 0.
      hidden.append([self._scorer.log2_probs(
          np.where(np.arange(x.shape[1]) < p, x, 0), weights, targets=x)[:, p]
                     for p in positions])
    return -float(np.mean(forced)), -float(np.mean(hidden))


def _text_data(cfg, record):
  """(training stream, validation batches, test batches) of a byte file."""
  from trax_hourglass.data import text  # pylint: disable=g-import-not-at-top

  # Data: the byte-file pipeline's splits and training batches.
  data = text.load_bytes(cfg['data'])
  bounds = text.byte_file_splits(len(data))
  inputs = text.byte_file_inputs(
      cfg['data'], batch_size=cfg['batch'], sequence_length=cfg['seq_len'],
      seed=harness.SEED)

  def windows(split, n_batches):
    """Batches of consecutive windows of `split` (0: every whole window)."""
    part = data[slice(*bounds[split])]
    n_windows = len(part) // cfg['seq_len']
    n_batches = n_batches or max(1, n_windows // cfg['batch'])
    batch = text.eval_batches(part, cfg['batch'], cfg['seq_len'])
    record[f'{split}_bytes'] = len(part)
    record[f'{split}_scored_bytes'] = n_batches * cfg['batch'] * cfg['seq_len']
    record[f'{split}_wraps'] = n_batches * cfg['batch'] > n_windows
    return [batch(i)[0] for i in range(n_batches)]

  valid_batches = windows('valid', cfg['eval_batches'])
  test_batches = windows('test', cfg['test_batches'])
  record.update(data_bytes=len(data), train_bytes=bounds['train'][1])
  return inputs.train_stream(1), valid_batches, test_batches


def _image_data(cfg, record):
  """The same of an .npz of images: the last 5% of its train_images validate."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass.data import images  # pylint: disable=g-import-not-at-top
  train, test = _load_images(cfg['data'])
  n_valid = _valid_images(len(train))
  train, valid = train[:-n_valid], train[-n_valid:]
  inputs = images.array_image_inputs(train, valid, 'equal_time',
                                     cfg['batch'], seed=harness.SEED)

  def batches(split, part, n_batches):
    """Batches of consecutive images of `part` (0: every whole batch)."""
    n_batches = n_batches or max(1, len(part) // cfg['batch'])
    flat = images.flatten_images(part)
    idx = np.arange(n_batches * cfg['batch']) % len(flat)  # Wraps if short.
    record[f'{split}_images'] = len(part)
    record[f'{split}_scored_images'] = len(idx)
    return list(flat[idx].reshape(n_batches, cfg['batch'], -1))

  record.update(train_images=len(train), image_shape=list(train.shape[1:]))
  return (inputs.train_stream(1), batches('valid', valid, cfg['eval_batches']),
          batches('test', test, cfg['test_batches']))


def _same_params_depth(cfg):
  """(N, hourglass params): the flat 'N@1' with the nearest parameter count."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top

  def count(hierarchy):
    model = _model_fn('hourglass', dict(cfg, hierarchy=hierarchy))(mode='eval')
    model.init(shapes.ShapeDtype((1, 6), np.int32))
    return harness.count_params(model.weights)

  # Parameters grow by the same block per flat layer.
  target, one, two = count(cfg['hierarchy']), count('1@1'), count('2@1')
  return max(1, round(1 + (target - one) / (two - one))), target


def _train(variant, cfg, trax, record):
  """Trains `variant` for `cfg['steps']`, else `cfg['seconds']` on
  `cfg['clock']`, scoring it into `record`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax.supervised import training  # pylint: disable=g-import-not-at-top

  stream, valid_batches, test_batches = (
      _image_data if _is_images(cfg) else _text_data)(cfg, record)
  if variant == 'same_params':
    flat_layers, hourglass_params = _same_params_depth(cfg)
    cfg = dict(cfg, flat_layers=flat_layers)
    record.update(flat_layers=flat_layers, hourglass_params=hourglass_params)

  model_fn = _model_fn(variant, cfg)
  start = time.perf_counter()
  task = training.TrainTask(
      labeled_data=stream,
      loss_layer=boundaries.loss_layer(variant),
      optimizer=trax.optimizers.Adam(cfg['learning_rate'],
                                     weight_decay_rate=0.0, b1=0.9, b2=0.98,
                                     eps=1e-9),
      lr_schedule=trax.lr.multifactor(
          constant=cfg['learning_rate'], factors='constant * linear_warmup',
          warmup_steps=cfg['warmup_steps']))
  loop = training.Loop(model_fn(mode='train'), [task], output_dir=None,
                       checkpoint_at=harness.never,
                       permanent_checkpoint_at=harness.never,
                       eval_at=harness.never, n_devices=1,
                       random_seed=harness.SEED)
  harness.block(loop.model.weights)
  record['init_s'] = time.perf_counter() - start
  record['n_params'] = harness.count_params(loop.model.weights)
  evaluate = _Evaluator(model_fn, valid_batches, cfg['seq_len'])

  # Untimed: the step that compiles the training step.
  start = time.perf_counter()
  loop.run(COMPILE_STEPS)
  harness.block((loop.model.weights, loop.model.state))
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
  train_s, timed_steps, step_s = 0., 0, None
  wall_s = cpu_s = 0.  # Both kinds of seconds, whichever the clock.

  def run(n):
    nonlocal train_s, timed_steps, step_s, wall_s, cpu_s
    wall, cpu = time.perf_counter(), time.process_time()
    loop.run(n)
    harness.block((loop.model.weights, loop.model.state))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall_s += wall
    cpu_s += cpu
    elapsed = cpu if cfg['clock'] == 'cpu' else wall
    train_s += elapsed
    timed_steps += n
    step_s = elapsed / n

  budget = cfg['steps'] or cfg['seconds']
  targets = [budget * (i + 1) / cfg['eval_points']
             for i in range(cfg['eval_points'])]
  for target in targets:
    while cfg['steps']:  # Equal steps: the compiling step counts.
      n = min(round(target) - loop.step,
              max(1, int(MAX_CHUNK_S / (step_s or MAX_CHUNK_S))))
      if n < 1:
        break
      run(n)
    while not cfg['steps']:
      remaining = target - train_s
      if step_s is None:  # First timed chunk: one step, to learn its cost.
        n = 1
      elif remaining < 2 * step_s:  # Stop within half a step of the target.
        n = int(remaining / step_s + 0.5)
      else:  # At most half the time left: a slowdown cannot overshoot much.
        n = max(1, int(min(MAX_CHUNK_S, remaining / 2) / step_s))
      if n < 1 or remaining <= 0:
        break
      run(n)
    eval_point(train_s, timed_steps)

  # Off the clock: the test split, and the leak at random probe positions.
  t = time.perf_counter()
  test = _Evaluator(model_fn, test_batches, cfg['seq_len'])
  record['test_bits_per_byte'] = test(loop.model.weights)
  positions = np.sort(np.random.default_rng(harness.SEED).choice(
      cfg['seq_len'], min(cfg['probe_positions'], cfg['seq_len']),
      replace=False))
  forced, hidden = test.leak(loop.model.weights, positions)
  record.update(probe_positions=positions.tolist(), probe_forced_bpb=forced,
                probe_hidden_bpb=hidden, leak_bits_per_byte=hidden - forced,
                test_s=time.perf_counter() - t)
  log(f'test: {record["test_bits_per_byte"]:.4f} bits/byte; at '
      f'{len(positions)} probe positions {forced:.4f} teacher-forced, '
      f'{hidden:.4f} with the future hidden')
  if variant in boundaries.KINDS:  # Off the clock: the segments it makes.
    boundaries.record_boundaries(
        model_fn, loop.model.weights, test_batches,
        boundaries.factor(variant, cfg), cfg['data'], record)

  factor, others = _factors(variant, cfg)
  if factor:
    record['factor'] = factor
  for other in others:  # The same weights, shortening by `other`.
    at = _with_factor(cfg['hierarchy'], other, variant)
    fn = functools.partial(model_fn, hierarchy=at, shorten_factor_dropout=())
    t = time.perf_counter()
    record[f'test_bits_per_byte_at_{other}'] = _Evaluator(
        fn, test_batches, cfg['seq_len'])(loop.model.weights)
    record[f'eval_at_{other}_s'] = time.perf_counter() - t
    record[f'hierarchy_at_{other}'] = at
    log(f'at factor {other} ({at!r}): '
        f'{record[f"test_bits_per_byte_at_{other}"]:.4f} test bits/byte')
  if cfg.get('weights_dir'):  # For the completions of the best model.
    import jax  # pylint: disable=g-import-not-at-top
    np.savez(os.path.join(cfg['weights_dir'], variant + '.npz'),
             *map(np.asarray, jax.tree_util.tree_leaves(loop.model.weights)))

  record.update(
      curve=curve, valid_bits_per_byte=curve[-1]['bits_per_byte'],
      clock=cfg['clock'], train_s=train_s, train_wall_s=wall_s,
      train_cpu_s=cpu_s, steps=loop.step, timed_steps=timed_steps,
      tokens_per_s=timed_steps * cfg['batch'] * cfg['seq_len'] / train_s,
      step_ms=1000. * train_s / timed_steps, eval_s=eval_s,
      xla_threads=harness.xla_threads(), load_after=os.getloadavg())


def _complete(variant, cfg, trax, record):
  """Completes the first test images with `variant`'s saved weights: a PNG.

  Top row the originals, below them `COMPLETION_ROWS` samples of their
  bottom halves given the top halves (the paper's Figure 7).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  del trax
  with np.load(os.path.join(cfg['weights_dir'], variant + '.npz'),
               allow_pickle=False) as f:
    weights = [f[f'arr_{i}'] for i in range(len(f.files))]
  originals = _load_images(cfg['data'])[1][:COMPLETION_IMAGES]
  model = decoding.load_predict_model(
      weights, model_fn=_model_fn(variant, cfg), max_len=cfg['seq_len'],
      batch_size=len(originals))
  start = time.perf_counter()
  rows = [decoding.complete_images(model, originals, seed=harness.SEED + i)
          for i in range(COMPLETION_ROWS)]
  record['sample_s'] = time.perf_counter() - start
  grid = decoding.image_grid(originals, np.stack(rows))
  decoding.save_png(grid.repeat(COMPLETION_SCALE, 0).repeat(
      COMPLETION_SCALE, 1), cfg['completion_png'])
  record.update(png=cfg['completion_png'], images=len(originals),
                rows=COMPLETION_ROWS)


def _worker(name, cfg):
  """Trains one variant in this (fresh) process, or with 'complete:VARIANT'
  completes images with its saved weights; prints one result line."""
  if cfg['clock'] == 'cpu':
    harness.one_xla_thread()
  variant = name.split(':')[-1]
  job = _complete if name.startswith('complete:') else _train
  return harness.work(functools.partial(job, variant, cfg), 'ours',
                      variant=variant, load_before=os.getloadavg())


# ------------------------------------------------------------------- parent --


def _parser():
  parser = harness.benchmark_parser(
      __doc__, quick='Smoke test: tiny sizes, ~10 s per variant, XLA '
      'optimization off; explicit flags below still override.',
      timeout='2 * --seconds + 1200; 10 * with --clock cpu; none with --steps')
  parser.add_argument('--data', metavar='PATH',
                      help='Byte file to train and score on (required), '
                      'e.g. ../shared/data/enwik8-head.xml.')
  parser.add_argument('--suite', choices=sorted(SUITES), default='claim',
                      help='Which variants to run (default %(default)s).')
  parser.add_argument('--variants',
                      help='Comma-separated variants instead of --suite\'s, '
                      f'from {",".join(ALL_VARIANTS)}.')
  parser.add_argument('--jobs', type=int, default=1,
                      help='Variants trained at once (default 1); more than '
                      'one needs --clock cpu.')
  parser.add_argument('--clock', choices=('wall', 'cpu'), default=None,
                      help='What --seconds counts: wall seconds, XLA on every '
                      'core (default; an idle machine), or the worker\'s CPU '
                      'seconds, XLA on one thread (a shared machine).')
  parser.add_argument('--out', metavar='DIR',
                      help='Write equal_time.json and equal_time.png '
                      '(validation bits/byte vs training time) here.')
  harness.add_config_flags(parser, REFERENCE, QUICK, [
      ('seconds', float),
      ('steps', int, 'Train this many steps each instead (0: --seconds).'),
      ('seq_len', int, 'Images: their H * W * C.'), ('batch', int), ('d_model', int),
      ('d_ff', int), ('n_heads', int), ('hierarchy', str), ('dropout', float),
      ('learning_rate', float), ('warmup_steps', int), ('eval_points', int),
      ('eval_batches', int),
      ('test_batches', int, '0 = every whole test window.'),
      ('probe_positions', int), ('lsh_chunk_len', int)])
  return parser


def _image_length(args, cfg):
  """H * W * C of the images of --data (an .npz), or SystemExit."""
  try:
    train, test = _load_images(cfg['data'])
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f'--data {args.data}: not an .npz with train_images and '
                     f'test_images ({type(e).__name__}: {e}).') from None
  if (train.dtype != 'uint8' or train.ndim != 4 or
      test.shape[1:] != train.shape[1:] or len(train) < 2 or not len(test)):
    raise SystemExit(f'--data {args.data}: train_images {train.dtype} '
                     f'{train.shape} and test_images {test.dtype} {test.shape}'
                     ' must be uint8 [N, H, W, C] of one shape (N >= 2).')
  length = math.prod(train.shape[1:])
  if args.seq_len not in (None, length):
    raise SystemExit(f'--seq_len {args.seq_len}: the images of --data are '
                     f'{length} tokens ({"x".join(map(str, train.shape[1:]))})'
                     '; leave --seq_len out.')
  return length


def _resolve_config(args, variants):
  suite = SUITE_CONFIG.get(args.suite, {})
  cfg = harness.config_from_args(
      args, dict(REFERENCE, **suite),
      dict(QUICK, steps=QUICK_STEPS if suite.get('steps') else 0))
  if not args.data:
    raise SystemExit('--data PATH is required: a byte file to train on, e.g. '
                     '../shared/data/enwik8-head.xml.')
  if not os.path.isfile(args.data):
    raise SystemExit(f'--data {args.data}: no such file.')
  cfg['data'] = os.path.abspath(args.data)
  boundaries.configure(cfg, variants)
  if (cfg['seconds'] <= 0 or cfg['eval_points'] < 1 or
      cfg['eval_batches'] < 1 or cfg['test_batches'] < 0 or
      cfg['probe_positions'] < 1 or cfg['steps'] < 0 or
      cfg['steps'] == COMPILE_STEPS):
    raise SystemExit('--seconds, --eval_points, --eval_batches and '
                     '--probe_positions must be positive, --test_batches >= 0, '
                     f'--steps 0 or more than {COMPILE_STEPS}.')
  if _is_images(cfg):
    cfg['seq_len'] = _image_length(args, cfg)
  if args.jobs < 1 or (args.jobs > 1 and cfg['clock'] != 'cpu'):
    raise SystemExit(f'--jobs {args.jobs}: use 1, or more with --clock cpu '
                     '(variants training at once share the wall clock).')
  hierarchies = {v: variant_hierarchy(v, cfg) for v in variants}
  for v in variants:
    for other in _factors(v, cfg)[1]:
      hierarchies[f'{v}@{other}'] = _with_factor(cfg['hierarchy'], other, v)
  for name, hierarchy in hierarchies.items():
    multiple = _hierarchy(hierarchy).total_factor if hierarchy else 1
    if cfg['seq_len'] % multiple:
      raise SystemExit(f'--seq_len {cfg["seq_len"]} must be divisible by '
                       f'{multiple}, the shortening of {name} (hierarchy '
                       f'{hierarchy!r}).')
  if 'lsh' in variants:
    lengths = [cfg['seq_len']] + [cfg['seq_len'] // level.total_factor for level
                                  in _hierarchy(cfg['hierarchy']).levels]
    bad = [n for n in lengths if (2 * n) % cfg['lsh_chunk_len']]
    if bad:
      raise SystemExit(
          f'lsh: 2 * length must be a multiple of --lsh_chunk_len '
          f'{cfg["lsh_chunk_len"]} at every level; lengths {lengths}.')
  n_bytes = os.path.getsize(cfg['data'])
  smallest = math.floor(0.95 * n_bytes) - math.floor(0.9 * n_bytes)
  if not _is_images(cfg) and smallest < cfg['seq_len']:
    raise SystemExit(f'--data {args.data}: {n_bytes:,} bytes is too small for '
                     f'--seq_len {cfg["seq_len"]} (5% of it is validation, 5% '
                     'test).')
  return cfg


def _command_line(argv):
  script = os.path.relpath(os.path.abspath(__file__), harness.REPO_ROOT)
  return ' '.join(shlex.quote(a) for a in ['python', script] + list(argv))


def _label(v, r):
  return v if r['variant'] == v else f'{v} ({r["variant"]})'


def _unit(cfg):
  return 'bits/dim' if _is_images(cfg) else 'bits/byte'


def _table(variants, results, cfg):
  unit = _unit(cfg)
  headers = ['variant', 'params', f'test {unit}', f'leak {unit}',
             f'valid {unit}', 'train tokens/s', 'steps',
             'train CPU s' if cfg['clock'] == 'cpu' else 'train s',
             'peak RSS MiB', 'compile s']
  rows = []
  for v in variants:
    r = results[v]
    if r['status'] != 'ok':
      rows.append([_label(v, r), harness.fmt(r.get('n_params'), ','),
                   'FAILED'] + ['n/a'] * 7)
      continue
    rows.append([_label(v, r), harness.fmt(r['n_params'], ','),
                 harness.fmt(r['test_bits_per_byte'], '.3f'),
                 harness.fmt(r['leak_bits_per_byte'], '.3f'),
                 harness.fmt(r['valid_bits_per_byte'], '.3f'),
                 harness.fmt(r['tokens_per_s']),
                 harness.fmt(r['steps'], ','),
                 harness.fmt(r['train_s'], '.0f'),
                 harness.fmt(r['peak_rss_mib']),
                 harness.fmt(r['compile_s'], '.0f')])
    for other in _factors(r['variant'], cfg)[1]:
      rows.append([f'{v}@{other}', harness.fmt(r['n_params'], ','),
                   harness.fmt(r[f'test_bits_per_byte_at_{other}'], '.3f')]
                  + ['same run'] * 7)
  return harness.markdown_table(headers, rows)


def _factor_table(variants, results, cfg):
  """The shorten-factor dropout family as the slides' Table 4: rows trained
  with, columns evaluated at; None with fewer than two such rows."""
  scored = {}
  for v in variants:
    r = results[v]
    factor, others = _factors(r['variant'], cfg)
    if r['status'] == 'ok' and factor:
      scored[v] = {factor: r['test_bits_per_byte'], **{
          f: r[f'test_bits_per_byte_at_{f}'] for f in others}}
  if len(scored) < 2:
    return None
  factors = sorted({f for s in scored.values() for f in s})
  trained = lambda v: (f'{v}: k in {{{", ".join(map(str, factors))}}}'
                       if v == 'sfd' else f'{v}: k = {_factors(v, cfg)[0]}')
  return harness.markdown_table(
      ['trained with'] + [f'eval at k={f}' for f in factors],
      [[trained(v)] + [harness.fmt(s.get(f), '.3f') for f in factors]
       for v, s in scored.items()])


def _plot(variants, results, cfg, title, path):
  """valid bits/byte vs training seconds, one line per variant; False if no matplotlib."""
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
            label=_label(v, r), linestyle='--' if r['variant'] == 'no_shift'
            else '-')
  ax.set_xlabel('training steps' if cfg['steps'] else CLOCK_LABELS[cfg['clock']]
                + ' (s, compilation and evaluation excluded)')
  ax.set_ylabel(f'validation {_unit(cfg)}')
  ax.set_title(f'{title}: d_model {cfg["d_model"]}, {cfg["batch"]} x '
               f'{cfg["seq_len"]} {"dims" if _is_images(cfg) else "bytes"}/'
               f'step, {os.path.basename(cfg["data"])}', fontsize=10)
  return harness.save_figure(fig, path)


def _run_variant(variant, cfg, timeout_s):
  record = harness.measure(__file__, variant, cfg, timeout_s, key='variant')
  harness.log(f'{variant}: ' + harness.record_line(
      record, lambda r: f'test {r["test_bits_per_byte"]:.4f} bits/byte, leak '
      f'{r["leak_bits_per_byte"]:.4f}, {r["tokens_per_s"]:,.0f} tokens/s, '
      f'{r["steps"]} steps'))
  return record


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


def _complete_best(results, cfg, out, timeout_s):
  """Runs the completion worker for the lowest test score; its record."""
  ok = [v for v, r in results.items() if r['status'] == 'ok']
  best = min(ok, key=lambda v: results[v]['test_bits_per_byte'])
  png = os.path.join(os.path.abspath(out), 'completions.png')
  record = harness.measure(__file__, f'complete:{results[best]["variant"]}',
                           dict(cfg, completion_png=png, flat_layers=results[
                               best].get('flat_layers')), timeout_s,
                           key='variant')
  harness.log(f'completions by {best}: ' + harness.record_line(
      record, lambda r: f'{r["png"]}, sampled in {r["sample_s"]:.0f} s'))
  return record


def _parent(args):
  variants = (list(SUITES[args.suite]) if args.variants is None else
              harness.parse_names(args.variants, ALL_VARIANTS, '--variants'))
  cfg = _resolve_config(args, variants)
  title = (f'Equal training {"steps" if cfg["steps"] else "time"}'
           + (f', suite {args.suite!r}' if args.variants is None else ''))
  # One thread on a crowded machine: CPU seconds may come at a tenth the rate.
  timeout_s = args.worker_timeout or (
      math.inf if cfg['steps'] else
      (10 if cfg['clock'] == 'cpu' else 2) * cfg['seconds'] + 1200)
  start = time.perf_counter()
  weights_dir = tempfile.TemporaryDirectory()  # Images: for the completions.
  if _is_images(cfg) and args.out:
    cfg['weights_dir'] = weights_dir.name

  def run(v):
    record = _run_variant(v, cfg, timeout_s)
    if v == 'lsh' and record['status'] != 'ok':
      harness.log('lsh: PureLSHSelfAttentionWrapper failed; running '
                  'LSHSelfAttention.')
      record = dict(_run_variant(LSH_FALLBACK, cfg, timeout_s),
                    wrapper_error=record['reason'])
    return record

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    results = dict(zip(variants, pool.map(run, variants)))
  failed = {r['variant']: r['reason'] for r in results.values()
            if r['status'] != 'ok'}
  ok = [results[v] for v in variants if results[v]['status'] == 'ok']
  completion = None
  if ok and 'weights_dir' in cfg:
    completion = _complete_best(results, cfg, args.out, timeout_s)
    if completion['status'] != 'ok':
      failed['completions'] = completion['reason']
  weights_dir.cleanup()
  cfg.pop('weights_dir', None)

  budget = (f'{cfg["steps"]:,} steps' if cfg['steps'] else
            f'{cfg["seconds"]:g} ' + (
                'CPU s (XLA on one thread, --clock cpu)'
                if cfg['clock'] == 'cpu' else 's')
            + ' (compilation and evaluation excluded)')
  print(f'{title}: each variant trained {budget} on '
        f'{os.path.basename(cfg["data"])}'
        + (_data_note(ok[0]) if ok else '')
        + f'; d_model {cfg["d_model"]}, d_ff {cfg["d_ff"]}, {cfg["n_heads"]} '
        f'heads, dropout {cfg["dropout"]:g}, {cfg["batch"]} x '
        f'{cfg["seq_len"]} {"dims" if _is_images(cfg) else "bytes"}/step, '
        f'Adam {cfg["learning_rate"]:g} after '
        f'{cfg["warmup_steps"]} warmup steps, seed {harness.SEED}'
        + (f', on {ok[0]["backend"]} ({ok[0]["device_kind"]}, '
           f'{os.cpu_count()} CPUs)' if ok else '')
        + (harness.QUICK_NOTE if cfg['fast_compile'] else '') + ':\n')
  print(_table(variants, results, cfg))
  print()
  factor_table = _factor_table(variants, results, cfg)
  if factor_table:
    print(f'Test {_unit(cfg)} by the shorten factor trained with (rows) and '
          f'evaluated at (columns):\n\n{factor_table}\n')
  if 'boundary_factor' in cfg:
    print(f'k = {cfg["boundary_factor"]}: the divisor of --seq_len nearest '
          f'{cfg["whitespace_segment"]:.2f}, the mean bytes per whitespace '
          'segment of the training split' + (
              f'; unigram: k = {cfg["unigram_factor"]}, nearest '
              f'{cfg["unigram_segment"]:.2f}, the mean bytes per segment of '
              'its targets there' if 'unigram_factor' in cfg else '')
          + '. Shortening achieved on the test split (benchmarks/'
          f'boundaries.py draws the segments):\n\n'
          f'{boundaries.table(variants, results)}\n')
  for v in variants:
    r = results[v]
    cfg_v = dict(cfg, flat_layers=r.get('flat_layers'))
    print(f'- {_label(v, r)}: {describe(r["variant"], cfg_v)}'
          + (f'; run in place of PureLSHSelfAttentionWrapper, which failed: '
             f'{r["wrapper_error"]}' if 'wrapper_error' in r else ''))
    if 'flat_layers' in r:
      print(f'  {r["flat_layers"]} layers: {r["n_params"]:,} parameters, the '
            f'hourglass {r["hourglass_params"]:,} '
            f'({r["n_params"] / r["hourglass_params"] - 1:+.1%}).')
  if completion and completion['status'] == 'ok':
    print(f'\nCompletions by {completion["variant"]}, the lowest test '
          f'{_unit(cfg)} (top row: the first {completion["images"]} test '
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
  print(f'\nCommand: {_command_line(args.argv)}')
  harness.log(f'total {time.perf_counter() - start:.0f} s')

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, 'equal_time.json')
    harness.write_json(
        json_path, benchmark='equal_time', command=_command_line(args.argv),
        clock=cfg['clock'], config=cfg, variants=variants, results=results,
        descriptions={v: describe(results[v]['variant'], dict(
            cfg, flat_layers=results[v].get('flat_layers')))
                      for v in variants}, completion=completion, failed=failed)
    png_path = os.path.join(args.out, 'equal_time.png')
    if _plot(variants, results, cfg, title, png_path):
      print(f'Wrote {json_path} and {png_path}.')
    else:
      print(f'Wrote {json_path}; no plot: matplotlib is not installed.')
  return 1 if failed or not ok else 0


def main(argv=None):
  return harness.main(_parser(), _worker, _parent, argv)


if __name__ == '__main__':
  sys.exit(main())
