"""Shortening and upsampling layers of the hourglass.

Each takes the constructor arguments of its trax namesake in
`trax.layers.research.resampling` (extra keyword arguments are ignored), so the
`downsampling_fn` / `upsampling_fn` / `attention_*_fn` arguments of `HourglassLM`
accept either, and weights are laid out alike.

Shortening maps (batch, len, d_model) -> (batch, len/k, d_model); upsampling maps
(batch, len/k, d_model) -> (batch, len, d_model).
"""

import functools
import inspect

import gin
import jax
import trax.layers as tl
from trax.layers import base
from trax.fastmath import numpy as jnp

from trax_hourglass.layers.attention import RelativeAttention
from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.layers.sparse import FeedForwardBlock


def _configurable(fn):
  return gin.configurable(fn, module='trax_hourglass')


def _groups(x, shorten_factor):
  """(batch, len, d) -> (batch, len/k, k, d): consecutive blocks of k vectors."""
  batch, length, d = x.shape
  if length % shorten_factor:
    raise ValueError(
        f'Cannot shorten a sequence of length {length} by {shorten_factor}: '
        'HourglassLM pads its inputs to a multiple of the total shorten factor; '
        'pad inputs to these layers likewise.')
  return x.reshape(batch, length // shorten_factor, shorten_factor, d)


@_configurable
def AveragePooling(shorten_factor, *args, **kwargs):
  """Mean of each block of `shorten_factor` vectors."""
  del args, kwargs
  return tl.Fn('AveragePooling',
               lambda x: jnp.mean(_groups(x, shorten_factor), axis=2))


@_configurable
def LinearPooling(shorten_factor, d_model, *args, dropout=0.0, mode='train',
                  **kwargs):
  """Concatenates each block of `shorten_factor` vectors and projects to d_model."""
  del args, kwargs
  def concat_blocks(x):
    batch, n_blocks = x.shape[0], x.shape[1] // shorten_factor
    return _groups(x, shorten_factor).reshape(batch, n_blocks, -1)
  return tl.Serial(
      tl.Fn('ConcatBlocks', concat_blocks),  # vecs: (batch, len/k, k*d_model)
      Dense(d_model),  # vecs: (batch, len/k, d_model)
      Dropout(rate=dropout, mode=mode),
  )


@_configurable
def NaiveUpsampling(shorten_factor, d_model, *args, mode='train', **kwargs):
  """Repeats each vector `shorten_factor` times.

  Predict mode gets the one short vector covering the current token: identity.
  """
  del d_model, args, kwargs
  if mode == 'predict':
    return tl.Serial(name='NaiveUpsampling')
  return tl.Fn('NaiveUpsampling',
               lambda x: jnp.repeat(x, shorten_factor, axis=1))


class SplitBlocks(base.Layer):
  """(batch, len/k, k*d) -> (batch, len, d); predict mode: the current token's d.

  In predict mode the input is the short vector covering the current token,
  and a token counter in the state says which of its k slices that is.
  """

  def __init__(self, shorten_factor, mode='train'):
    super().__init__(name='SplitBlocks')
    self._factor = shorten_factor
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros((), jnp.int32)

  def forward(self, x):
    batch, length, width = x.shape
    blocks = x.reshape(batch, length * self._factor, width // self._factor)
    if self._mode != 'predict':
      return blocks
    n_done = self.state
    self.state = n_done + 1
    return jax.lax.dynamic_slice_in_dim(blocks, n_done % self._factor, 1, 1)


@_configurable
def LinearUpsampling(shorten_factor, d_model, *args, dropout=0.0, mode='train',
                     **kwargs):
  """Projects each vector to `shorten_factor` vectors of d_model."""
  del args, kwargs
  return tl.Serial(
      Dense(shorten_factor * d_model),  # vecs: (batch, len/k, k*d_model)
      Dropout(rate=dropout, mode=mode),
      SplitBlocks(shorten_factor, mode),  # vecs: (batch, len, d_model)
  )


@_configurable
def AttentionResampling(shorten_factor, d_model, is_upsampling, d_ff, n_heads,
                        dropout, dropout_shared_axes, mode, ff_activation,
                        context_bias_layer, location_bias_layer, total_pooling,
                        resampling_fn, max_inference_length=2048,
                        ff_sparsity=0):
  """Resampling refined by attention (the paper's attention pooling/upsampling).

  `resampling_fn` makes the queries at the new length; they attend to the vectors
  at the old length, then a feed-forward block follows (`FeedForwardBlock`:
  trax's `SparseFF` when `ff_sparsity` > 0). When upsampling, the full-length
  residual stream (the second input) joins the queries.

  Shortening: vecs (batch, len, d) -> (batch, len/k, d).
  Upsampling: (short (batch, len/k, d), residual (batch, len, d)) ->
              (vecs (batch, len, d), residual).
  Predict mode: len is k (the current shifted block) when shortening, and 1
  when upsampling; `max_inference_length` (a multiple of k) is the longest
  sequence at the finer level, the size of the keys' cache when shortening
  (1/k of it when upsampling: the keys are then the short vectors).
  """
  keys_len = (max_inference_length // shorten_factor if is_upsampling
              else max_inference_length)
  return [
      LayerNorm(),  # h
      tl.Branch([resampling_fn(shorten_factor, d_model, mode=mode),
                 LayerNorm()], None),  # queries, h
      [tl.Select([0, 2, 1, 2]), tl.Add()] if is_upsampling else [],  # +residual
      tl.Residual(  # queries attend to h; kv_pooling: h's accumulated shortening
          RelativeAttention(d_model, n_heads, dropout, mode, context_bias_layer,
                            location_bias_layer, total_pooling, shorten_factor,
                            is_upsampling, keys_len),
          Dropout(rate=dropout, shared_axes=dropout_shared_axes, mode=mode),
      ),  # vecs
      FeedForwardBlock(d_model, d_ff, dropout, dropout_shared_axes, mode,
                       ff_activation, ff_sparsity),  # vecs
  ]


# trax registers its namesakes under `trax.layers`, so a bare `@LinearPooling`
# (as trax's gin files write) would match theirs and ours, which gin refuses.
# gin prefers an exact name: the bare names are registered for trax's layers
# (a function without a module gets one), and `HourglassLM` builds ours in
# their place (`ours_for`).
def _bare_name_for(theirs):
  @functools.wraps(theirs)
  def layer(*args, **kwargs):
    return theirs(*args, **kwargs)
  layer.__module__ = None
  gin.external_configurable(layer)


_OURS = {}
for _fn in (AveragePooling, LinearPooling, NaiveUpsampling, LinearUpsampling,
            AttentionResampling):
  _bare_name_for(getattr(tl, _fn.__name__))
  _OURS[inspect.unwrap(getattr(tl, _fn.__name__))] = _fn


def ours_for(fn):
  """Our resampling layer for trax's namesake `fn`; any other `fn` as it is."""
  return _OURS.get(inspect.unwrap(fn), fn)
