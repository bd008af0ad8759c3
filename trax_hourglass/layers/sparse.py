"""Sparse layers of "Sparse is Enough in Scaling Transformers" (Jaszczur et al.
2021) as hourglass building blocks, wired as trax's `ConfigurableTransformerLM`
wires its `ff_sparsity` and `loss_sparsity`.

Sparsity 0 gives back this project's dense layers unchanged (same weights), so
existing checkpoints keep loading.
"""

import numbers

import gin
import trax.layers as tl
from trax.layers.research import sparsity as trax_sparsity

from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.feed_forward import FeedForwardResidual

# Gumbel-softmax temperature of the SparseFF controller in training, and the share
# of steps that use the quantized (one-hot) mask instead of the soft one; trax's
# values for an integer `ff_sparsity`.
_SPARSE_FF_TEMPERATURE = 0.1
_SPARSE_FF_QUANT_PROB = 0.3


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


@_configurable
def FeedForwardBlock(d_model, d_ff, dropout, dropout_shared_axes, mode,
                     ff_activation, ff_sparsity=0):
  """Pre-norm feed-forward block with its residual: vecs -> vecs.

  vecs: (batch, len, d_model). ff_sparsity=0 is `FeedForwardResidual`. N > 0 is
  trax's `SparseFF`: d_ff split into d_ff/N blocks of N units, one unit active
  per block, chosen by a low-rank (d_ff/N) controller; ReLU, so `ff_activation`
  is unused. Position-wise in every mode, 'predict' included.
  """
  _check_sparsity('ff_sparsity', ff_sparsity, 'd_ff', d_ff)
  if not ff_sparsity:
    return FeedForwardResidual(d_model, d_ff, dropout, dropout_shared_axes, mode,
                               ff_activation)
  del ff_activation
  return tl.Residual(
      tl.LayerNorm(),
      # SparseFF ends with its own dropout (on its output), so unlike the dense
      # block none follows here: trax adds none either.
      trax_sparsity.SparseFF(
          d_ff, n_elements_in_block=ff_sparsity, d_lowrank=d_ff // ff_sparsity,
          temperature=_SPARSE_FF_TEMPERATURE, quant_prob=_SPARSE_FF_QUANT_PROB,
          mode=mode, dropout_rate=dropout,
          dropout_shared_axes=dropout_shared_axes),  # vecs: (batch, len, d_model)
  )


@_configurable
def VocabProjection(vocab_size, d_model, loss_sparsity=0, mode='train'):
  """vecs (batch, len, d_model) -> logits (batch, len, vocab_size).

  loss_sparsity=0 is `Dense(vocab_size)` (`tl.Dense`'s weights). N > 0 is the
  multiplicative dense (trax's `FactoredDense`): N gating vectors of d_model
  times one shared (d_model, vocab_size/N) matrix, about N times fewer weights.
  """
  _check_sparsity('loss_sparsity', loss_sparsity, 'vocab_size', vocab_size)
  if not loss_sparsity:
    return Dense(vocab_size)
  return trax_sparsity.SparseDenseWithOptions(
      vocab_size, d_input=d_model, sparsity_type='mult',
      sparsity=loss_sparsity, mode=mode)  # logits: (batch, len, vocab_size)
