"""Sparse layers of "Sparse is Enough in Scaling Transformers" (Jaszczur et al.
2021) as hourglass building blocks, wired as trax's `ConfigurableTransformerLM`
wires its `ff_sparsity` and `loss_sparsity`.

Sparsity 0 gives back this project's dense layers unchanged (same weights), so
existing checkpoints keep loading.
"""

import numbers

import gin
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers.research import sparsity as trax_sparsity

from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.feed_forward import FeedForwardResidual
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.layers import predict_weights

# Gumbel-softmax temperature of the SparseFF controller in training, and the share
# of steps that use the quantized (one-hot) mask instead of the soft one; trax's
# values for an integer `ff_sparsity`.
_SPARSE_FF_TEMPERATURE = 0.1
_SPARSE_FF_QUANT_PROB = 0.3
# Gathering one unit per block of N reads about a quarter of w1 per row (one
# float per 64-byte cache line of a block of 64); past N / 16 rows per call
# reading w1 whole is cheaper.
_ROWS_PER_DENSE_READ = 16


def _configurable(fn):
  return gin.configurable(fn, module='trax_hourglass')


def _nearest_divisor(n, target):
  """The divisor of n closest to target (the larger, sparser, on a tie)."""
  return min((d for d in range(1, n + 1) if n % d == 0),
             key=lambda d: (abs(d - target), -d))


def _check_sparsity(name, value, width_name, width):
  """Raises ValueError unless value is an int >= 0 dividing width (when > 0)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < 0):
    raise ValueError(
        f'{name}={value!r} must be an int >= 0 (0: dense).')
  if value and width % value:
    raise ValueError(
        f'{name}={value} must divide {width_name}={width}, e.g. {name}='
        f'{_nearest_divisor(width, value)}.')


class _ChosenUnitsFF(trax_sparsity._SparseFFMain):  # pylint: disable=protected-access
  """trax's main part of `SparseFF`, same weights; predict mode reads only the
  weights of the chosen units.

  trax's predict mode transposes both d_model x d_ff kernels on every call,
  which costs more than the dense block. Here: (quant_mask (..., d_ff/N),
  x (..., d_model)) -> (quant_mask, x'), gathering for each block i the
  column of w1 (d_model, d_ff/N, N) and the row of w2 (N, d_ff/N, d_model)
  of its chosen unit. Given a fourth weight, w1 laid out unit by unit
  (d_ff, d_model) (see `laid_out_for_decoding`), it reads each chosen unit's
  column as one contiguous row instead of one float per cache line.
  """

  def forward(self, inputs):
    if self._mode != 'predict' or self._multiply_by_controller_output:
      return super().forward(inputs)
    chosen, x = inputs
    w1, w2, b2 = self.weights[:3]
    d_model, n_blocks, block = w1.shape
    x_2d = x.reshape(-1, d_model)
    rows = x_2d.shape[0]
    chosen_2d = chosen.reshape(rows, n_blocks)
    units = jnp.arange(n_blocks) * block + chosen_2d  # (rows, d_ff/N)
    if rows * _ROWS_PER_DENSE_READ > block:  # Reading all weights is cheaper.
      mid = jnp.dot(x_2d, w1.reshape(d_model, -1))
      mid = jnp.take_along_axis(mid, units, axis=1)
    elif isinstance(self.weights, predict_weights.DecodingLayout):
      # w1 unit by unit, a fourth weight: a row per chosen unit.
      mid = jnp.einsum('rd,rid->ri', x_2d, self.weights[3][units])
    else:  # A flat gather: w1's chosen entries are one per cache line.
      flat = jnp.arange(d_model)[None, :, None] * (n_blocks * block) + units[
          :, None, :]  # (rows, d_model, d_ff/N)
      # In bounds by construction; jnp.take's default mode ('fill') adds a
      # select that XLA:CPU fuses with the gather into a loop ~10x slower.
      mid = jnp.einsum('rd,rdi->ri', x_2d, jnp.take(
          w1.reshape(-1), flat, mode='clip'))
    out = jnp.einsum('ri,rid->rd', jnp.maximum(mid, 0.0),
                     w2[chosen_2d, jnp.arange(n_blocks)[None, :], :]) + b2
    return chosen, out.reshape(x.shape)

  def laid_out_for_decoding(self, weights):
    """Adds w1 laid out unit by unit, (d_ff, d_model), as a fourth weight.

    See `predict_weights`: made once per kernel, not per token; costs the
    memory of the first kernel again.
    """
    if self._multiply_by_controller_output:
      return weights
    return tuple(weights) + (jnp.asarray(weights[0]).reshape(
        weights[0].shape[0], -1).T,)



def _reading_chosen_units(layer):
  """`layer` with trax's `_SparseFFMain` made a `_ChosenUnitsFF`, in place."""
  for sublayer in layer.sublayers:
    if type(sublayer) is trax_sparsity._SparseFFMain:  # pylint: disable=protected-access
      sublayer.__class__ = _ChosenUnitsFF  # Same attributes and weights.
    _reading_chosen_units(sublayer)
  return layer


@_configurable
def FeedForwardBlock(d_model, d_ff, dropout, dropout_shared_axes, mode,
                     ff_activation, ff_sparsity=0):
  """Pre-norm feed-forward block with its residual: vecs -> vecs.

  vecs: (batch, len, d_model). ff_sparsity=0 is `FeedForwardResidual`. N > 0 is
  trax's `SparseFF`: d_ff split into d_ff/N blocks of N units, one unit active
  per block, chosen by a low-rank (d_ff/N) controller; ReLU, so `ff_activation`
  is unused. Position-wise in every mode; predict mode computes only the
  chosen units (see `_ChosenUnitsFF`).
  """
  _check_sparsity('ff_sparsity', ff_sparsity, 'd_ff', d_ff)
  if not ff_sparsity:
    return FeedForwardResidual(d_model, d_ff, dropout, dropout_shared_axes, mode,
                               ff_activation)
  del ff_activation
  return tl.Residual(
      LayerNorm(),
      # SparseFF ends with its own dropout (on its output), so unlike the dense
      # block none follows here: trax adds none either.
      _reading_chosen_units(trax_sparsity.SparseFF(
          d_ff, n_elements_in_block=ff_sparsity, d_lowrank=d_ff // ff_sparsity,
          temperature=_SPARSE_FF_TEMPERATURE, quant_prob=_SPARSE_FF_QUANT_PROB,
          mode=mode, dropout_rate=dropout,
          dropout_shared_axes=dropout_shared_axes)),  # vecs: (batch, len, d_model)
  )


@_configurable
def VocabProjection(vocab_size, d_model, loss_sparsity=0, mode='train'):
  """vecs (batch, len, d_model) -> logits (batch, len, vocab_size), float32.

  loss_sparsity=0 is `Dense(vocab_size)` (`tl.Dense`'s weights). N > 0 is the
  multiplicative dense (trax's `FactoredDense`): N gating vectors of d_model
  times one shared (d_model, vocab_size/N) matrix, about N times fewer weights.
  """
  _check_sparsity('loss_sparsity', loss_sparsity, 'vocab_size', vocab_size)
  if not loss_sparsity:  # Logits in float32 from any vecs: for the loss.
    return Dense(vocab_size, out_dtype=jnp.float32)
  return trax_sparsity.SparseDenseWithOptions(
      vocab_size, d_input=d_model, sparsity_type='mult',
      sparsity=loss_sparsity, mode=mode)  # logits: (batch, len, vocab_size)
