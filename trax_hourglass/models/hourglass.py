"""Hourglass: a Transformer LM whose middle layers run on a shortened sequence.

full-length layers -> shift right by k-1 -> shorten by k -> shortened layers
(possibly a nested hourglass) -> upsample by k, added back as a residual ->
full-length layers. Arguments, defaults and weights match trax's
`trax.models.research.hourglass.HourglassLM`; see README for what is added.
"""

import dataclasses
import functools

import gin
import trax.layers as tl
from trax.fastmath import numpy as jnp

from trax_hourglass.layers.attention import RelativeAttentionBiases
from trax_hourglass.layers.attention import RelativeAttentionWrapper
from trax_hourglass.layers.attention_types import SelfAttention
from trax_hourglass.layers.attention_types import constructor_parameters
from trax_hourglass.layers.attention_types import has_positions
from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers import precision
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.layers.remat import Rematerialized
from trax_hourglass.layers.resampling import AttentionResampling
from trax_hourglass.layers.resampling import AveragePooling
from trax_hourglass.layers.resampling import LinearUpsampling
from trax_hourglass.layers.sparse import FeedForwardBlock
from trax_hourglass.layers.sparse import VocabProjection
from trax_hourglass.models.config import checked_config
from trax_hourglass.models.levels import DynamicLevel
from trax_hourglass.models.levels import ShortenedLevel
from trax_hourglass.models.router_level import RouterLevel
from trax_hourglass.models.predict import Autoregressive
from trax_hourglass.models.predict import PastMaxLenError  # pylint: disable=unused-import  # Its old place.
from trax_hourglass.models.predict import TokenShift


@gin.configurable(module='trax_hourglass')
def HourglassLM(vocab_size, d_model=512, d_ff=2048, vanilla_layers=(1, 1),
                hierarchy='6@3', n_heads=8, dropout=0.1,
                dropout_shared_axes=None, mode='train',
                ff_activation=tl.FastGelu,
                vanilla_attn_type=RelativeAttentionWrapper,
                middle_attn_type=RelativeAttentionWrapper,
                downsampling_fn=AttentionResampling,
                upsampling_fn=AttentionResampling,
                attention_downsampling_fn=AveragePooling,
                attention_upsampling_fn=LinearUpsampling, max_len=2048,
                ff_sparsity=0, loss_sparsity=0, shorten_factor_dropout=(),
                boundaries='fixed', boundary_tokens=dynamic.WHITESPACE_TOKENS,
                sentencepiece_model=None,
                shortened_bound=dynamic.SHORTENED_BOUND, remat='none',
                dtype='float32'):
  """Returns a hierarchical Transformer language model.

  Input: tokens (batch, len) of ints in [0, vocab_size), any len: the model pads
  internally to a multiple of the total shorten factor and crops back. Ids
  outside are clamped, not checked (as trax's `tl.Embedding`; a compiled step
  cannot raise). Output: (batch, len, vocab_size) unnormalised
  log-probabilities (logits, as trax's `TransformerLM`) of token t given
  tokens < t.

  In predict mode (trax's decoding convention) the model keeps key/value caches
  per level in its state and takes the previous token, 0 first: feeding
  0, x0, x1, ... yields the eval-mode logits of x one position per call. A
  longer input (a prompt) is decoded token by token in one call. Shortened
  layers run once every k tokens of their level (dynamic boundaries: once
  per closed segment), and predict mode returns logits alone. Weights are
  those of a train or eval model with the same arguments.

  Args: each is documented in `models.config.HourglassConfig`, the object
  that carries them to the layers; e.g. `hierarchy` '8@3' (8 layers at 1/3
  length), '1@2 2@6 1@2' (nested) or the paper's '2@1 8@3 2@1'.

  Returns:
    A trax layer: tokens -> logits (learned boundaries, train and eval:
    tokens -> (logits, boundary_loss)).
  """
  cfg = checked_config(**locals())  # Or ValueError saying what works.
  biases = RelativeAttentionBiases(cfg.d_model, cfg.n_heads, cfg.dtype)
  spec, fixed = cfg.hierarchy, cfg.boundaries == 'fixed'
  n_pre, n_post = spec.vanilla_layers
  model = (functools.partial(Autoregressive, max_len=cfg.max_len)
           if cfg.mode == 'predict' else tl.Serial)
  return model(  # toks: (batch, len)
      tl.Dup(),  # toks, toks
      PadToMultiple(cfg.pad_multiple, cfg.mode),  # toks: (batch, len'), toks
      TokenShift(cfg.mode),  # toks: shifted (train, eval), counted (predict)
      [] if fixed else tl.Dup(),  # dynamic: the level's tokens too
      _Embedding(cfg),  # vecs: (batch, len', d_model)
      _Blocks(cfg, biases, n_pre, 1, cfg.vanilla_attn_type),  # vecs
      _ShortenedLevels(cfg, biases),  # vecs (learned boundaries: vecs, aux)
      _Blocks(cfg, biases, n_post, 1, cfg.vanilla_attn_type)
      if spec.levels else [],  # vecs
      VocabProjection(cfg.vocab_size, cfg.d_model, cfg.loss_sparsity,
                      cfg.mode),  # logits
      dynamic.BoundaryLoss(cfg.boundaries, spec.total_factor,
                           cfg.sentencepiece_model)
      if cfg.boundaries in dynamic.LEARNED and cfg.mode != 'predict' else
      CropToInputLength(),  # logits (batch, len, vocab_size)[, loss]
  )


def _Embedding(cfg):
  """toks (batch, len) -> vecs (batch, len, d_model), in the compute dtype.

  Every activation stays in that dtype until the logits (float32).
  """
  return [
      precision.Embedding(cfg.vocab_size, cfg.d_model, cfg.dtype),  # vecs
      Dropout(rate=cfg.dropout, shared_axes=cfg.dropout_shared_axes,
              mode=cfg.mode),  # vecs
      [] if has_positions(cfg.vanilla_attn_type) else
      precision.PositionalEncoding(max_len=cfg.padded_len, mode=cfg.mode),
  ]  # vecs: tokens (+ absolute positions when attention has none)


def _ShortenedLevels(cfg, biases):
  """vecs (batch, len', d_model) -> vecs: the hierarchy's shortened levels.

  Dynamic boundaries: (vecs, toks) -> vecs (learned: vecs, aux (batch, len')).
  """
  levels = cfg.hierarchy.levels
  if cfg.boundaries != 'fixed':
    return _DynamicValley(cfg, biases, levels[0])
  if levels:
    return _Valley(cfg, biases, levels, 1, cfg.shorten_factor_dropout)
  return []  # '12@1': a plain Transformer.


def _Blocks(cfg, biases, n_layers, total_factor, attention_type,
            max_level_len=None):
  """n_layers decoder blocks at 1/total_factor length, then LayerNorm.

  vecs (batch, len/total_factor, d_model) -> vecs. `biases`: the relative
  attention's (context, location) bias layers, shared by the whole model.
  `max_level_len`: the level's longest sequence in predict mode (default
  padded_len / total_factor).
  """
  blocks = [
      DecoderBlock(  # pylint: disable=g-complex-comprehension
          SelfAttention(attention_type, cfg.d_model, cfg.n_heads, cfg.dropout,
                        cfg.mode, *biases, total_factor,
                        max_level_len or cfg.padded_len // total_factor),
          cfg.d_model, cfg.d_ff, cfg.dropout, cfg.dropout_shared_axes,
          cfg.mode, cfg.ff_activation, cfg.ff_sparsity)
      for _ in range(n_layers)
  ]
  if cfg.remat == 'blocks' and cfg.mode != 'predict':  # Each half of a block.
    blocks = [[Rematerialized(half) for half in block] for block in blocks]
  return blocks + [LayerNorm()]


def _Resampling(cfg, biases, factory, resampling_fn, shorten_factor,
                total_factor, upsampling):
  """`factory`'s layer shortening (or upsampling) by shorten_factor.

  total_factor: the shortening of the longer side, relative to the tokens.
  """
  context_bias, location_bias = biases
  kwargs = {}
  if 'max_inference_length' in constructor_parameters(factory):
    kwargs['max_inference_length'] = cfg.padded_len // total_factor
  if 'ff_sparsity' in constructor_parameters(factory):
    kwargs['ff_sparsity'] = cfg.ff_sparsity
  return factory(
      shorten_factor, d_model=cfg.d_model, is_upsampling=upsampling,
      d_ff=cfg.d_ff, n_heads=cfg.n_heads, dropout=cfg.dropout,
      dropout_shared_axes=cfg.dropout_shared_axes, mode=cfg.mode,
      ff_activation=cfg.ff_activation, context_bias_layer=context_bias,
      location_bias_layer=location_bias, total_pooling=total_factor,
      resampling_fn=resampling_fn, **kwargs)


def _Valley(cfg, biases, levels, total_factor, shorten_factor_dropout=()):
  """vecs (batch, len/p, d) -> vecs, shortening by the first of `levels`.

  p = total_factor, the shortening outside the level. Training with
  `shorten_factor_dropout` also builds the level at each of those factors.
  """
  level, inner = levels[0], levels[1:]
  if shorten_factor_dropout and cfg.mode == 'train':
    shorten_factor_dropout = [_Valley(  # pylint: disable=g-complex-comprehension
        cfg, biases, [dataclasses.replace(
            level, shorten_factor=k, total_factor=total_factor * k)], 1)
                              for k in shorten_factor_dropout]
  else:
    shorten_factor_dropout = ()
  shorten_factor = level.shorten_factor
  inner_total = total_factor * shorten_factor
  blocks = _Blocks(cfg, biases, level.n_layers, inner_total,
                   cfg.middle_attn_type)
  middle = [blocks, _Valley(cfg, biases, inner, inner_total), _Blocks(
      cfg, biases, level.n_layers, inner_total, cfg.middle_attn_type)
           ] if inner else [blocks]
  return ShortenedLevel(
      shorten_factor,
      _Resampling(cfg, biases, cfg.downsampling_fn,
                  cfg.attention_downsampling_fn, shorten_factor, total_factor,
                  upsampling=False),  # (batch, len/pk, d_model)
      middle,  # short: (batch, len/pk, d_model)
      _Resampling(cfg, biases, cfg.upsampling_fn, cfg.attention_upsampling_fn,
                  shorten_factor, total_factor,
                  upsampling=True),  # (batch, len/p, d_model)
      mode=cfg.mode, shorten_factor_dropout=shorten_factor_dropout)


def _DynamicValley(cfg, biases, level):
  """(vecs (batch, len, d), toks (batch, len)) -> vecs[, aux]."""
  shorten_factor = level.shorten_factor
  middle = _Blocks(cfg, biases, level.n_layers, shorten_factor,
                   cfg.middle_attn_type,
                   dynamic.shortened_length(cfg.padded_len, shorten_factor,
                                            cfg.shortened_bound))  # (b, S, d)
  if cfg.boundaries == 'router':
    return RouterLevel(shorten_factor, middle, mode=cfg.mode,
                       bound=cfg.shortened_bound, max_len=cfg.padded_len)
  if cfg.boundaries == 'whitespace':
    ends = dynamic.WhitespaceBoundaries(cfg.boundary_tokens)
  else:
    ends = dynamic.BoundaryPredictor(cfg.boundaries, cfg.d_ff,
                                     cfg.ff_activation, cfg.mode)
  return DynamicLevel(cfg.boundaries, shorten_factor, ends, middle,
                      mode=cfg.mode, bound=cfg.shortened_bound,
                      max_len=cfg.padded_len)


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
