"""Hourglass: a Transformer LM whose middle layers run on a shortened sequence.

full-length layers -> shift right by k-1 -> shorten by k -> shortened layers
(possibly a nested hourglass) -> upsample by k, added back as a residual ->
full-length layers. Arguments, defaults and weights match trax's
`trax.models.research.hourglass.HourglassLM`; see README for what is added.
"""

import dataclasses
import functools
import math

import gin
import trax.layers as tl
from trax.fastmath import numpy as jnp

from trax_hourglass.hierarchy import parse_hierarchy
from trax_hourglass.layers.attention import RelativeAttentionBiases
from trax_hourglass.layers.attention import RelativeAttentionWrapper
from trax_hourglass.layers.attention_types import SelfAttention
from trax_hourglass.layers.attention_types import constructor_parameters
from trax_hourglass.layers.attention_types import has_positions
from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers import segmentation
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers import precision
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.layers.remat import Rematerialized
from trax_hourglass.layers.resampling import AttentionResampling
from trax_hourglass.layers.resampling import AveragePooling
from trax_hourglass.layers.resampling import LinearPooling
from trax_hourglass.layers.resampling import LinearUpsampling
from trax_hourglass.layers.resampling import ours_for
from trax_hourglass.layers.sparse import FeedForwardBlock
from trax_hourglass.layers.sparse import VocabProjection
from trax_hourglass.models.levels import DynamicLevel
from trax_hourglass.models.levels import ShortenedLevel
from trax_hourglass.models.predict import Autoregressive
from trax_hourglass.models.predict import PastMaxLenError  # pylint: disable=unused-import  # Its old place.
from trax_hourglass.models.predict import TokenShift


# HourglassLM's remat: none, or each decoder block (see `layers.remat`).
REMAT = ('none', 'blocks')


def PadToMultiple(multiple, mode='train'):
  """toks: (batch, len) -> (batch, len') with len' the next multiple, zeros after.

  Padding goes after the tokens, so by causality no real position sees it.
  Predict mode takes a token at a time: nothing to pad.
  """
  def pad(toks):
    extra = 0 if mode == 'predict' else -toks.shape[1] % multiple
    return jnp.pad(toks, ((0, 0), (0, extra))) if extra else toks
  return tl.Fn(f'PadToMultiple{multiple}', pad)


def CropToInputLength():
  """(vecs (batch, len', ...), toks (batch, len)) -> vecs (batch, len, ...)."""
  return tl.Fn('CropToInputLength', lambda vecs, toks: vecs[:, :toks.shape[1]])


def DecoderBlock(attention, d_model, d_ff, dropout, dropout_shared_axes, mode,
                 ff_activation, ff_sparsity=0):
  """Pre-norm Transformer block around `attention`: vecs -> vecs."""
  return [
      tl.Residual(LayerNorm(), attention, Dropout(  # vecs
          rate=dropout, shared_axes=dropout_shared_axes, mode=mode)),
      FeedForwardBlock(d_model, d_ff, dropout, dropout_shared_axes, mode,
                       ff_activation, ff_sparsity),  # vecs
  ]


@gin.configurable(module='trax_hourglass')
def HourglassLM(vocab_size,
                d_model=512,
                d_ff=2048,
                vanilla_layers=(1, 1),
                hierarchy='6@3',
                n_heads=8,
                dropout=0.1,
                dropout_shared_axes=None,
                mode='train',
                ff_activation=tl.FastGelu,
                vanilla_attn_type=RelativeAttentionWrapper,
                middle_attn_type=RelativeAttentionWrapper,
                downsampling_fn=AttentionResampling,
                upsampling_fn=AttentionResampling,
                attention_downsampling_fn=AveragePooling,
                attention_upsampling_fn=LinearUpsampling,
                max_len=2048,
                ff_sparsity=0,
                loss_sparsity=0,
                shorten_factor_dropout=(),
                boundaries='fixed',
                boundary_tokens=dynamic.WHITESPACE_TOKENS,
                sentencepiece_model=None,
                shortened_bound=dynamic.SHORTENED_BOUND,
                remat='none',
                dtype='float32'):
  """Returns a hierarchical Transformer language model.

  Input: tokens (batch, len) of ints in [0, vocab_size), any len: the model pads
  internally to a multiple of the total shorten factor and crops back.
  Output: (batch, len, vocab_size) unnormalised log-probabilities (logits, as
  trax's `TransformerLM`) of token t given tokens < t.

  In predict mode (trax's decoding convention) the model keeps key/value caches
  per level in its state and takes the previous token, 0 first: feeding
  0, x0, x1, ... yields the eval-mode logits of x one position per call. A
  longer input (a prompt) is decoded token by token in one call. Shortened
  layers run once every k tokens of their level (dynamic boundaries: once
  per closed segment), and predict mode returns logits alone. Weights are
  those of a train or eval model with the same arguments.

  Args:
    vocab_size: Number of token ids. Inputs must lie in [0, vocab_size): as
      trax's `tl.Embedding` (a jax gather), ids outside are clamped, not
      checked (a compiled step cannot raise), so 300 reads as vocab_size - 1
      and -1 as 0. The trainer's data and `hourglass-eval` check the ids.
    d_model: Width of the residual stream.
    d_ff: Width of the feed-forward blocks.
    vanilla_layers: (pre, post) full-length layers around the shortening.
    hierarchy: Shortened levels, e.g. '8@3' (8 layers at 1/3 length), '1@2 2@6
      1@2' (nested), or the paper's '2@1 8@3 2@1' (full-length layers included;
      then `vanilla_layers` is taken from it; '12@1' alone is a plain
      Transformer of 12 layers). See `trax_hourglass.hierarchy`.
    n_heads: Attention heads.
    dropout: Dropout rate for hidden vectors and attention probabilities.
    dropout_shared_axes: Axes sharing one dropout mask, e.g. (0, 1).
    mode: 'train', 'eval' or 'predict'.
    ff_activation: Activation layer class of the feed-forward blocks.
    vanilla_attn_type: Attention in the full-length layers: our
      `RelativeAttentionWrapper` or a trax attention class (see
      `layers.SelfAttention`).
    middle_attn_type: Attention in the shortened layers, likewise.
    downsampling_fn: Shortening layer factory (`AttentionResampling`,
      `AveragePooling`, `LinearPooling`).
    upsampling_fn: Upsampling layer factory (`AttentionResampling`,
      `NaiveUpsampling`, `LinearUpsampling`).
    attention_downsampling_fn: The pooling inside `AttentionResampling` when it
      shortens.
    attention_upsampling_fn: The upsampling inside `AttentionResampling` when it
      upsamples.
    max_len: Longest sequence in predict mode (the caches' size); decoding
      past it raises. Train and eval take any length. Also the length of the
      absolute positions added at the embedding when `vanilla_attn_type` has
      no positions of its own (e.g. `tl.CausalAttention`, `tl.CausalFavor`).
    ff_sparsity: 0 (dense) or N: every feed-forward block of the model is
      trax's `SparseFF`, one unit active in each block of N ("Sparse is Enough
      in Scaling Transformers"; see `layers.FeedForwardBlock`): those of the
      decoder blocks (full-length and shortened) and those of
      `AttentionResampling` (attention pooling and upsampling). The other
      resampling layers have none.
    loss_sparsity: 0 (dense) or N: the vocabulary projection is the
      multiplicative sparse dense of the same paper; see
      `layers.VocabProjection`.
    shorten_factor_dropout: () or factors, e.g. (2, 3), for a single shortened
      level: each training step shortens by a factor drawn uniformly from
      them (one compiled step holds all), so the weights work at each; eval
      and predict use the factor in `hierarchy`. Needs resampling whose
      weights do not depend on the factor (not linear pooling/upsampling).
    boundaries: where the shortened level pools (dynamic pooling, Nawrot et
      al. 2023; needs exactly one shortened level, whose factor k is then the
      target average segment length, and ignores the resampling arguments:
      segments are averaged, see `DynamicLevel`): 'fixed' (every k tokens,
      the hourglass), 'whitespace' (a segment ends after each token of
      `boundary_tokens`), or a learned predictor: 'entropy' (trained toward
      spikes of the model's prediction entropy), 'unigram' (toward the
      SentencePiece pieces of `sentencepiece_model`), 'gumbel' (end to end,
      a hard Gumbel-sigmoid with a Binomial(len, 1/k) prior). Learned
      boundaries make the train and eval models return (logits,
      boundary_loss): train them with `LossWithBoundaries` (the trainer
      binds it).
    boundary_tokens: the token ids 'whitespace' ends segments after; by
      default the bytes of ASCII space, tab, CR and LF.
    sentencepiece_model: path of a SentencePiece unigram model ('unigram').
    shortened_bound: dynamic levels shorten to a static length S = 1 +
      ceil(shortened_bound * len / k) (the null vector and the first S-1
      segments); positions after more segments than that keep reading the
      last shortened vector (stale, never from the future).
    remat: 'none', or 'blocks': train (and eval) recompute each decoder
      block's activations in the backward pass from its input, for about a
      third more compute and a fraction of the activation memory; same
      outputs, gradients and weights (see `layers.remat`). Predict mode
      ignores it.
    dtype: the compute dtype, 'float32' or 'bfloat16' (mixed precision:
      matrix products, attention and the residual stream in bfloat16;
      softmax, LayerNorm and the logits in float32). The weights are float32
      either way, so checkpoints load into either. See `layers.precision`.

  Returns:
    A trax layer: tokens -> logits (learned boundaries, train and eval:
    tokens -> (logits, boundary_loss)).
  """
  if mode not in ('train', 'eval', 'predict'):
    raise ValueError(f"mode={mode!r}; use 'train', 'eval' or 'predict'.")
  if remat not in REMAT:
    raise ValueError(f'remat={remat!r}; use one of '
                     f'{", ".join(repr(r) for r in REMAT)}.')
  dtype = precision.check_dtype(dtype)
  spec = parse_hierarchy(hierarchy, vanilla_layers)
  # trax's resampling layers (`@LinearPooling` in trax's gin files) -> ours.
  downsampling_fn, upsampling_fn, attention_downsampling_fn, \
      attention_upsampling_fn = map(ours_for, (
          downsampling_fn, upsampling_fn, attention_downsampling_fn,
          attention_upsampling_fn))
  if max_len < 1:
    raise ValueError(f'max_len={max_len} must be positive, e.g. 2048.')
  kind = _check_boundaries(boundaries, spec, shorten_factor_dropout,
                           sentencepiece_model, shortened_bound, mode,
                           vocab_size, boundary_tokens)
  factor_dropout = _check_factor_dropout(shorten_factor_dropout, spec, [
      downsampling_fn, upsampling_fn,
      attention_downsampling_fn if downsampling_fn is AttentionResampling
      else None,
      attention_upsampling_fn if upsampling_fn is AttentionResampling
      else None])
  if kind != 'fixed':  # Segments have no fixed length: nothing to pad.
    padded_len, pad_multiple = max_len, 1
  else:
    # Caches hold whole shortened positions: round up to the total factor.
    padded_len = -(-max_len // spec.total_factor) * spec.total_factor
    pad_multiple = math.lcm(spec.total_factor, *factor_dropout)
  context_bias, location_bias = RelativeAttentionBiases(d_model, n_heads,
                                                        dtype)

  def _Blocks(n_layers, total_pooling, attention_type, max_level_len=None):
    """n_layers blocks at a level shortened by total_pooling, then LayerNorm."""
    blocks = [
        DecoderBlock(  # pylint: disable=g-complex-comprehension
            SelfAttention(attention_type, d_model, n_heads, dropout, mode,
                          context_bias, location_bias, total_pooling,
                          max_level_len or padded_len // total_pooling),
            d_model, d_ff, dropout, dropout_shared_axes, mode, ff_activation,
            ff_sparsity)
        for _ in range(n_layers)
    ]
    if remat == 'blocks' and mode != 'predict':  # Each half of each block.
      blocks = [[Rematerialized(half) for half in block] for block in blocks]
    return blocks + [LayerNorm()]

  def _Resampling(factory, resampling_fn, factor, total_pooling, upsampling):
    kwargs = {}
    if 'max_inference_length' in constructor_parameters(factory):
      kwargs['max_inference_length'] = padded_len // total_pooling
    if 'ff_sparsity' in constructor_parameters(factory):
      kwargs['ff_sparsity'] = ff_sparsity
    return factory(
        factor, d_model=d_model, is_upsampling=upsampling, d_ff=d_ff,
        n_heads=n_heads, dropout=dropout,
        dropout_shared_axes=dropout_shared_axes, mode=mode,
        ff_activation=ff_activation, context_bias_layer=context_bias,
        location_bias_layer=location_bias, total_pooling=total_pooling,
        resampling_fn=resampling_fn, **kwargs)

  def _Valley(levels, total_pooling, factor_dropout=()):
    """vecs (batch, len/p, d) -> vecs, shortening by the first of `levels`."""
    level, inner = levels[0], levels[1:]
    factor = level.shorten_factor
    if factor_dropout and mode == 'train':
      factor_dropout = [_Valley([dataclasses.replace(  # pylint: disable=g-complex-comprehension
          level, shorten_factor=k, total_factor=total_pooling * k)], 1)
                        for k in factor_dropout]
    else:
      factor_dropout = ()
    pooling = total_pooling * factor
    blocks = _Blocks(level.n_layers, pooling, middle_attn_type)
    middle = [blocks, _Valley(inner, pooling), _Blocks(
        level.n_layers, pooling, middle_attn_type)] if inner else [blocks]
    return ShortenedLevel(
        factor,
        _Resampling(downsampling_fn, attention_downsampling_fn, factor,
                    total_pooling, upsampling=False),  # (b, len/pk, d)
        middle,  # short: (batch, len/pk, d_model)
        _Resampling(upsampling_fn, attention_upsampling_fn, factor,
                    total_pooling, upsampling=True),  # (b, len/p, d)
        mode=mode, shorten_factor_dropout=factor_dropout)

  def _DynamicValley(level):
    """(vecs (batch, len, d), toks (batch, len)) -> vecs[, aux]."""
    k = level.shorten_factor
    if kind == 'whitespace':
      ends = dynamic.WhitespaceBoundaries(boundary_tokens)
    else:
      ends = dynamic.BoundaryPredictor(kind, d_ff, ff_activation, mode)
    return DynamicLevel(
        kind, k, ends,
        _Blocks(level.n_layers, k, middle_attn_type, dynamic.shortened_length(
            padded_len, k, shortened_bound)),  # (batch, S, d_model)
        mode=mode, bound=shortened_bound, max_len=padded_len)

  n_pre, n_post = spec.vanilla_layers
  model = (functools.partial(Autoregressive, max_len=max_len)
           if mode == 'predict' else tl.Serial)
  if kind == 'fixed':
    level = _Valley(spec.levels, 1, factor_dropout) if spec.levels else []
  else:
    level = _DynamicValley(spec.levels[0])
  return model(  # toks: (batch, len)
      tl.Dup(),  # toks, toks
      PadToMultiple(pad_multiple, mode),  # toks: (batch, len'), toks
      TokenShift(mode),  # toks: shifted right (train, eval), counted (predict)
      [] if kind == 'fixed' else tl.Dup(),  # dynamic: the level's tokens too
      precision.Embedding(vocab_size, d_model, dtype),  # vecs: (batch, len',
      # d_model) in dtype, as is every activation until the logits (float32)
      Dropout(rate=dropout, shared_axes=dropout_shared_axes, mode=mode),
      [] if has_positions(vanilla_attn_type) else precision.PositionalEncoding(
          max_len=padded_len, mode=mode),  # vecs: tokens + absolute positions
      _Blocks(n_pre, 1, vanilla_attn_type),  # vecs
      level,  # vecs (learned boundaries: vecs, aux: (batch, len'))
      _Blocks(n_post, 1, vanilla_attn_type) if spec.levels else [],  # vecs
      VocabProjection(vocab_size, d_model, loss_sparsity, mode),  # logits
      dynamic.BoundaryLoss(kind, spec.total_factor, sentencepiece_model)
      if kind in dynamic.LEARNED and mode != 'predict' else  # logits, loss
      CropToInputLength(),  # logits: (batch, len, vocab_size)
  )


def _check_boundaries(boundaries, spec, factor_dropout, sentencepiece_model,
                      bound, mode, vocab_size, boundary_tokens):
  """Returns `boundaries` if HourglassLM can build it, or raises saying what works."""
  kinds = ', '.join(repr(kind) for kind in dynamic.KINDS)
  if boundaries not in dynamic.KINDS:
    raise ValueError(f'boundaries={boundaries!r}; use one of {kinds}.')
  if boundaries == 'fixed':
    return boundaries
  if len(spec.levels) != 1:
    raise ValueError(
        f'boundaries={boundaries!r} needs exactly one shortened level, got '
        f"{len(spec.levels)}; e.g. hierarchy='2@1 8@3 2@1' (k=3: the target "
        'average segment length).')
  if factor_dropout:
    raise ValueError(
        f'boundaries={boundaries!r} takes no shorten_factor_dropout (got '
        f"{tuple(factor_dropout)}); use it with boundaries='fixed'.")
  if not (isinstance(bound, (int, float)) and bound > 0):
    raise ValueError(f'shortened_bound={bound!r} must be a positive number '
                     f'(the shortened length over len/k), e.g. '
                     f'{dynamic.SHORTENED_BOUND}.')
  if boundaries == 'whitespace' and not (
      isinstance(boundary_tokens, (tuple, list)) and boundary_tokens and all(
          isinstance(t, int) and 0 <= t < vocab_size for t in boundary_tokens)):
    raise ValueError(
        f'boundary_tokens={boundary_tokens!r} must be token ids in [0, '
        f'vocab_size={vocab_size}), e.g. {dynamic.WHITESPACE_TOKENS} (the '
        'bytes of space, tab, CR, LF).')
  if boundaries == 'unigram':
    if not sentencepiece_model:
      raise ValueError(
          "boundaries='unigram' needs sentencepiece_model: the path of a "
          'SentencePiece .model file (its pieces train the predictor).')
    if vocab_size > 256:
      raise ValueError(
          f"boundaries='unigram' segments bytes, but vocab_size={vocab_size}; "
          'use it with byte-level data (vocab_size 256).')
    segmentation.sentencepiece_model(sentencepiece_model)  # Or ValueError.
  return boundaries


def _check_factor_dropout(factors, spec, resampling_fns):
  """Returns shorten_factor_dropout as a tuple, or raises saying what works."""
  factors = tuple(factors or ())
  if not factors:
    return ()
  example = "e.g. hierarchy='8@3', shorten_factor_dropout=(2, 3)"
  if len(spec.levels) != 1:
    raise ValueError(
        f'shorten_factor_dropout={factors} needs exactly one shortened level, '
        f'got {len(spec.levels)}; {example}.')
  if not all(isinstance(k, int) and k >= 1 for k in factors):
    raise ValueError(
        f'shorten_factor_dropout={factors} must hold positive ints; {example}.')
  sized = [fn for fn in resampling_fns if fn in (LinearPooling, LinearUpsampling)]
  if sized:
    names = ', '.join(sorted({fn.__name__ for fn in sized}))
    raise ValueError(
        f'shorten_factor_dropout={factors} needs resampling whose weights do not '
        f'depend on the factor, but {names} has k*d_model-sized weights; use '
        'AveragePooling / NaiveUpsampling (also inside AttentionResampling: '
        'attention_upsampling_fn=NaiveUpsampling).')
  return factors
