"""Hourglass: a Transformer LM whose middle layers run on a shortened sequence.

full-length layers -> shift right by k-1 -> shorten by k -> shortened layers
(possibly a nested hourglass) -> upsample by k, added back as a residual ->
full-length layers. Arguments, defaults and weights match trax's
`trax.models.research.hourglass.HourglassLM`; see README for what is added.
"""

import gin
import trax.layers as tl
from trax.fastmath import numpy as jnp

from trax_hourglass.hierarchy import parse_hierarchy
from trax_hourglass.layers.attention import RelativeAttentionBiases
from trax_hourglass.layers.attention import RelativeAttentionWrapper
from trax_hourglass.layers.attention import SelfAttention
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers.resampling import AttentionResampling
from trax_hourglass.layers.resampling import AveragePooling
from trax_hourglass.layers.resampling import FeedForwardResidual
from trax_hourglass.layers.resampling import LinearUpsampling


def CausalShift(shorten_factor, mode='train'):
  """Shifts vectors right by k-1 before shortening by k, so nothing leaks.

  Shortened vector i then summarises tokens up to k*i (its block, shifted), and
  upsampled position t only sees shortened vectors of tokens <= t. Without the
  shift, position k*i would see token k*i + k - 1 of the future.
  """
  return tl.ShiftRight(shorten_factor - 1, mode=mode)


def PadToMultiple(multiple):
  """toks: (batch, len) -> (batch, len') with len' the next multiple, zeros after.

  Padding goes after the tokens, so by causality no real position sees it.
  """
  def pad(toks):
    extra = -toks.shape[1] % multiple
    return jnp.pad(toks, ((0, 0), (0, extra))) if extra else toks
  return tl.Fn(f'PadToMultiple{multiple}', pad)


def CropToInputLength():
  """(vecs (batch, len', ...), toks (batch, len)) -> vecs (batch, len, ...)."""
  return tl.Fn('CropToInputLength', lambda vecs, toks: vecs[:, :toks.shape[1]])


def DecoderBlock(attention, d_model, d_ff, dropout, dropout_shared_axes, mode,
                 ff_activation):
  """Pre-norm Transformer block around `attention`: vecs -> vecs."""
  def _Dropout():
    return Dropout(rate=dropout, shared_axes=dropout_shared_axes, mode=mode)

  return [
      tl.Residual(tl.LayerNorm(), attention, _Dropout()),  # vecs
      FeedForwardResidual(d_model, d_ff, dropout, dropout_shared_axes, mode,
                          ff_activation),  # vecs
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
                attention_upsampling_fn=LinearUpsampling):
  """Returns a hierarchical Transformer language model.

  Input: tokens (batch, len) of ints in [0, vocab_size), any len: the model pads
  internally to a multiple of the total shorten factor and crops back.
  Output: (batch, len, vocab_size) unnormalised log-probabilities (logits, as
  trax's `TransformerLM`) of token t given tokens < t.

  Args:
    vocab_size: Number of token ids.
    d_model: Width of the residual stream.
    d_ff: Width of the feed-forward blocks.
    vanilla_layers: (pre, post) full-length layers around the shortening.
    hierarchy: Shortened levels, e.g. '8@3' (8 layers at 1/3 length), '1@2 2@6
      1@2' (nested), or the paper's '2@1 8@3 2@1' (full-length layers included;
      then `vanilla_layers` is taken from it). See `trax_hourglass.hierarchy`.
    n_heads: Attention heads.
    dropout: Dropout rate for hidden vectors and attention probabilities.
    dropout_shared_axes: Axes sharing one dropout mask, e.g. (0, 1).
    mode: 'train' or 'eval'.
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

  Returns:
    A trax layer: tokens -> logits.
  """
  if mode == 'predict':
    raise ValueError("mode='predict' is not supported yet; use 'train' or 'eval'.")
  spec = parse_hierarchy(hierarchy, vanilla_layers)
  context_bias, location_bias = RelativeAttentionBiases(d_model, n_heads)

  def _Dropout():
    return Dropout(rate=dropout, shared_axes=dropout_shared_axes, mode=mode)

  def _Blocks(n_layers, total_pooling, attention_type):
    """n_layers blocks at a level shortened by total_pooling, then LayerNorm."""
    return [
        DecoderBlock(  # pylint: disable=g-complex-comprehension
            SelfAttention(attention_type, d_model, n_heads, dropout, mode,
                          context_bias, location_bias, total_pooling),
            d_model, d_ff, dropout, dropout_shared_axes, mode, ff_activation)
        for _ in range(n_layers)
    ] + [tl.LayerNorm()]

  def _Resampling(factory, resampling_fn, factor, total_pooling, upsampling):
    return factory(
        factor, d_model=d_model, is_upsampling=upsampling, d_ff=d_ff,
        n_heads=n_heads, dropout=dropout,
        dropout_shared_axes=dropout_shared_axes, mode=mode,
        ff_activation=ff_activation, context_bias_layer=context_bias,
        location_bias_layer=location_bias, total_pooling=total_pooling,
        resampling_fn=resampling_fn)

  def _Valley(levels, total_pooling):
    """vecs (batch, len/p, d) -> vecs, shortening by the first of `levels`."""
    level, inner = levels[0], levels[1:]
    factor = level.shorten_factor
    pooling = total_pooling * factor
    blocks = _Blocks(level.n_layers, pooling, middle_attn_type)
    middle = [blocks, _Valley(inner, pooling), _Blocks(
        level.n_layers, pooling, middle_attn_type)] if inner else [blocks]
    return [
        tl.Dup(),  # vecs, vecs
        CausalShift(factor, mode=mode),  # vecs shifted by k-1, vecs
        _Resampling(downsampling_fn, attention_downsampling_fn, factor,
                    total_pooling, upsampling=False),  # short: (b, len/pk, d)
        middle,  # short
        _Resampling(upsampling_fn, attention_upsampling_fn, factor,
                    total_pooling, upsampling=True),  # vecs: (b, len/p, d)
        tl.LayerNorm(),
        tl.Add(),  # vecs: upsampled + residual
    ]

  n_pre, n_post = spec.vanilla_layers
  return tl.Serial(  # toks: (batch, len)
      tl.Dup(),  # toks, toks
      PadToMultiple(spec.total_factor),  # toks: (batch, len'), toks
      tl.ShiftRight(mode=mode),
      tl.Embedding(vocab_size, d_model),  # vecs: (batch, len', d_model)
      _Dropout(),
      _Blocks(n_pre, 1, vanilla_attn_type),  # vecs
      _Valley(spec.levels, 1) if spec.levels else [],  # vecs
      _Blocks(n_post, 1, vanilla_attn_type) if spec.levels else [],  # vecs
      tl.Dense(vocab_size),  # logits: (batch, len', vocab_size)
      CropToInputLength(),  # logits: (batch, len, vocab_size)
  )
