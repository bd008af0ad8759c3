"""The dense feed-forward block of the decoder and the resampling blocks."""

import trax.layers as tl

from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers.precision import LayerNorm


def FeedForwardResidual(d_model, d_ff, dropout, dropout_shared_axes, mode,
                        ff_activation):
  """Pre-norm position-wise feed-forward block with its residual: vecs -> vecs.

  vecs: (batch, len, d_model).
  """
  def _Dropout():
    return Dropout(rate=dropout, shared_axes=dropout_shared_axes, mode=mode)
  return tl.Residual(
      LayerNorm(),
      Dense(d_ff),  # vecs: (batch, len, d_ff)
      ff_activation(),
      _Dropout(),
      Dense(d_model),  # vecs: (batch, len, d_model)
      _Dropout(),
  )
