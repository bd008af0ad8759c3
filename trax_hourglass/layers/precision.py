"""Mixed precision: weights in float32, activations in a compute dtype.

`HourglassLM(dtype='bfloat16')` embeds tokens into bfloat16 vectors and every
layer of ours then computes in the dtype of its input: `Dense` casts its
float32 kernel to it (matrix products in bfloat16), `LayerNorm` and the
attention softmax compute in float32 and return the input's dtype, and the
vocabulary projection accumulates its logits in float32 (the loss is float32).
The weights are float32 in either precision, the same arrays as trax's, so a
checkpoint loads into either; gradients reach them through the casts as
float32 and the optimizer updates them in float32.

The residual stream is bfloat16 too (as flax's lm1b and MaxText keep it):
that halves the activations kept for the backward pass, the point of training
long sequences, and needs no dtype argument in any layer below the model;
trax's own layers that a model may hold (its attention types, `SparseFF`)
compute on float32 weights in float32, and the stream is then float32 after
them.
"""

import trax.layers as tl
from trax import shapes
from trax.fastmath import numpy as jnp

# Compute dtypes `HourglassLM` takes. float16 would need loss scaling.
DTYPES = ('float32', 'bfloat16')


def check_dtype(dtype):
  """The name of `dtype` if it is one of DTYPES, else ValueError saying which."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; use one of '
                     f'{", ".join(repr(d) for d in DTYPES)}.')
  return name


class Embedding(tl.Embedding):
  """`tl.Embedding` (same weights) whose vectors are cast to `dtype`.

  toks (batch, len) -> vecs (batch, len, d_feature) in `dtype`.
  """

  def __init__(self, vocab_size, d_feature, dtype='float32'):
    super().__init__(vocab_size, d_feature)
    self._dtype = check_dtype(dtype)

  dtype = property(lambda self: self._dtype)

  def forward(self, x):
    return super().forward(x).astype(self._dtype)


class LayerNorm(tl.LayerNorm):
  """`tl.LayerNorm` (same weights, float32) computed in float32.

  vecs (..., d) -> (..., d) in the dtype of vecs: bfloat16 has too few
  significant digits for the mean and variance of a sum of many terms.
  """

  def forward(self, x):
    return super().forward(x.astype(jnp.float32)).astype(x.dtype)

  def init_weights_and_state(self, input_signature):
    super().init_weights_and_state(
        shapes.ShapeDtype(input_signature.shape, jnp.float32))


class PositionalEncoding(tl.PositionalEncoding):
  """`tl.PositionalEncoding` (same weights and state) keeping the input's dtype.

  vecs (batch, len, d) -> vecs + positions, in the dtype of vecs.
  """

  def forward(self, x):
    return super().forward(x).astype(x.dtype)


def activation_dtype(model):
  """The compute dtype (a name) of a model of ours; 'float32' for any other."""
  if isinstance(model, Embedding):
    return model.dtype
  for layer in model.sublayers:
    dtype = activation_dtype(layer)
    if dtype != 'float32':
      return dtype
  return 'float32'
