"""`HourglassConfig`: HourglassLM's arguments, checked, in one object.

`HourglassLM` checks its arguments once, here, and hands the builders of its
layers this config instead of the arguments one by one.
"""

import dataclasses
import math
from typing import Any, Tuple

from trax_hourglass.hierarchy import Hierarchy
from trax_hourglass.hierarchy import parse_hierarchy
from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers import precision
from trax_hourglass.layers import segmentation
from trax_hourglass.layers.resampling import AttentionResampling
from trax_hourglass.layers.resampling import LinearPooling
from trax_hourglass.layers.resampling import LinearUpsampling
from trax_hourglass.layers.resampling import ours_for

MODES = ('train', 'eval', 'predict')
# HourglassLM's remat: none, or each decoder block (see `layers.remat`).
REMAT = ('none', 'blocks')
# The arguments naming a resampling layer factory: trax's are made ours.
RESAMPLING = ('downsampling_fn', 'upsampling_fn', 'attention_downsampling_fn',
              'attention_upsampling_fn')


@dataclasses.dataclass(frozen=True)
class HourglassConfig:
  """The hyperparameters of an `HourglassLM`: its arguments, checked.

  Made by `checked_config`. The fields are HourglassLM's arguments, except
  that `hierarchy` is parsed (a `hierarchy.Hierarchy`, which holds the
  effective `vanilla_layers`), trax's resampling factories are replaced by
  ours, `dtype` is a name and `shorten_factor_dropout` a tuple; and two are
  derived: `padded_len`, max_len rounded up to whole shortened positions
  (the caches' size), and `pad_multiple`, the multiple the model pads its
  input to.

  HourglassLM's arguments:
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
      no positions of its own (e.g. `tl.CausalAttention`, `tl.CausalFavor`),
      and what dynamic levels' bound S counts from (`shortened_bound`).
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
      a hard Gumbel-sigmoid with a Binomial(len, 1/k) prior), 'router'
      (H-Net's dynamic chunking: a chunk starts where adjacent vectors turn
      apart, p = (1 - cos(W_q v[t-1], W_k v[t])) / 2 > 0.5; each chunk's
      first vector is pooled, the outputs smoothed by an EMA over chunks,
      with H-Net's ratio loss toward 1/k chunk starts; see `RouterLevel`).
      Learned boundaries make the train and eval models return (logits,
      boundary_loss): train them with `LossWithBoundaries` (the trainer
      binds it).
    boundary_tokens: the token ids 'whitespace' ends segments after; by
      default the bytes of ASCII space, tab, CR and LF.
    sentencepiece_model: path of a SentencePiece unigram model ('unigram').
    shortened_bound: dynamic levels pool at most the null vector and the
      first S-1 segments, S = 1 + ceil(shortened_bound * max_len / k), in
      every mode (so no output depends on the input's length: train and
      eval at max_len tokens, and predict mode, agree); positions after
      more segments than that keep reading the last shortened vector (stale,
      never from the future). An input of len tokens shortens to min(S, len
      + 1) vectors, a static shape.
    remat: 'none', or 'blocks': train (and eval) recompute each decoder
      block's activations in the backward pass from its input, for about a
      third more compute and a fraction of the activation memory; same
      outputs, gradients and weights (see `layers.remat`). Predict mode
      ignores it.
    dtype: the compute dtype, 'float32' or 'bfloat16' (mixed precision:
      matrix products, attention and the residual stream in bfloat16;
      softmax, LayerNorm and the logits in float32). The weights are float32
      either way, so checkpoints load into either. See `layers.precision`.
  """
  vocab_size: int
  d_model: int
  d_ff: int
  hierarchy: Hierarchy
  n_heads: int
  dropout: float
  dropout_shared_axes: Any
  mode: str
  ff_activation: Any
  vanilla_attn_type: Any
  middle_attn_type: Any
  downsampling_fn: Any
  upsampling_fn: Any
  attention_downsampling_fn: Any
  attention_upsampling_fn: Any
  max_len: int
  ff_sparsity: int
  loss_sparsity: int
  shorten_factor_dropout: Tuple[int, ...]
  boundaries: str
  boundary_tokens: Tuple[int, ...]
  sentencepiece_model: Any
  shortened_bound: float
  remat: str
  dtype: str
  padded_len: int
  pad_multiple: int


def checked_config(vanilla_layers, **arguments):
  """HourglassLM's arguments -> `HourglassConfig`, or ValueError saying what
  would work."""
  mode, remat = arguments['mode'], arguments['remat']
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; use 'train', 'eval' or 'predict'.")
  if remat not in REMAT:
    raise ValueError(f'remat={remat!r}; use one of '
                     f'{", ".join(repr(r) for r in REMAT)}.')
  arguments['dtype'] = precision.check_dtype(arguments['dtype'])
  spec = arguments['hierarchy'] = parse_hierarchy(arguments['hierarchy'],
                                                  vanilla_layers)
  # trax's resampling layers (`@LinearPooling` in trax's gin files) -> ours.
  arguments.update({name: ours_for(arguments[name]) for name in RESAMPLING})
  max_len = arguments['max_len']
  if max_len < 1:
    raise ValueError(f'max_len={max_len} must be positive, e.g. 2048.')
  arguments['boundaries'] = _check_boundaries(
      arguments['boundaries'], spec, arguments['shorten_factor_dropout'],
      arguments['sentencepiece_model'], arguments['shortened_bound'],
      arguments['vocab_size'], arguments['boundary_tokens'])
  shorten_factors = arguments['shorten_factor_dropout'] = (
      _check_shorten_factor_dropout(
          arguments['shorten_factor_dropout'], spec,
          _resampling_fns(arguments)))
  if arguments['boundaries'] != 'fixed':  # No fixed length: nothing to pad.
    padded_len, pad_multiple = max_len, 1
  else:
    # Caches hold whole shortened positions: round up to the total factor.
    padded_len = -(-max_len // spec.total_factor) * spec.total_factor
    pad_multiple = math.lcm(spec.total_factor, *shorten_factors)
  return HourglassConfig(padded_len=padded_len, pad_multiple=pad_multiple,
                         **arguments)


def _resampling_fns(arguments):
  """The resampling factories the model builds (None for one it does not)."""
  down, up = arguments['downsampling_fn'], arguments['upsampling_fn']
  return [down, up,
          arguments['attention_downsampling_fn']
          if down is AttentionResampling else None,
          arguments['attention_upsampling_fn']
          if up is AttentionResampling else None]


def _check_boundaries(boundaries, spec, shorten_factor_dropout,
                      sentencepiece_model, bound, vocab_size, boundary_tokens):
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
  if shorten_factor_dropout:
    raise ValueError(
        f'boundaries={boundaries!r} takes no shorten_factor_dropout (got '
        f"{tuple(shorten_factor_dropout)}); use it with boundaries='fixed'.")
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


def _check_shorten_factor_dropout(shorten_factors, spec, resampling_fns):
  """Returns shorten_factor_dropout as a tuple, or raises saying what works."""
  shorten_factors = tuple(shorten_factors or ())
  if not shorten_factors:
    return ()
  example = "e.g. hierarchy='8@3', shorten_factor_dropout=(2, 3)"
  if len(spec.levels) != 1:
    raise ValueError(
        f'shorten_factor_dropout={shorten_factors} needs exactly one shortened level, '
        f'got {len(spec.levels)}; {example}.')
  if not all(isinstance(k, int) and k >= 1 for k in shorten_factors):
    raise ValueError(
        f'shorten_factor_dropout={shorten_factors} must hold positive ints; {example}.')
  sized = [fn for fn in resampling_fns if fn in (LinearPooling, LinearUpsampling)]
  if sized:
    names = ', '.join(sorted({fn.__name__ for fn in sized}))
    raise ValueError(
        f'shorten_factor_dropout={shorten_factors} needs resampling whose weights do not '
        f'depend on the factor, but {names} has k*d_model-sized weights; use '
        'AveragePooling / NaiveUpsampling (also inside AttentionResampling: '
        'attention_upsampling_fn=NaiveUpsampling).')
  return shorten_factors
