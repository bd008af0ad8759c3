"""Dropout with masks from XLA's counter-based RngBitGenerator.

Same Bernoulli(1 - rate) masks as `tl.Dropout`, drawn from another generator:
jax's default threefry costs ~3x more on CPU, and in a Transformer trained with
dropout the masks of the attention probabilities alone took half the time of
each attention layer.
"""

import jax
import numpy as np
import trax.layers as tl
from trax.fastmath import numpy as jnp

_WEYL = np.uint32(0x9E3779B9)  # Spreads the 2-word trax key over 4 rbg words.


def bernoulli_mask(rng, keep_prob, shape):
  """Bool mask of `shape`, True with probability `keep_prob` (to 2**-32)."""
  key = jnp.asarray(rng, jnp.uint32).reshape(-1)[:2]
  key = jax.random.wrap_key_data(jnp.concatenate([key, key ^ _WEYL]),
                                 impl='rbg')
  bits = jax.random.bits(key, shape, jnp.uint32)
  return bits < np.uint32(min(round(keep_prob * 2.0**32), 2**32 - 1))


def apply_dropout(x, rate, rng, shared_axes=()):
  """x with entries zeroed with probability `rate`, the rest scaled by 1/(1-rate).

  Args:
    x: any array.
    rate: a Python float in [0, 1).
    rng: a trax/jax PRNG key (uint32[2]).
    shared_axes: axes along which one mask value is broadcast.
  """
  if rate == 0.0:
    return x
  shape = tuple(1 if axis in shared_axes or axis - x.ndim in shared_axes else n
                for axis, n in enumerate(x.shape))
  keep = bernoulli_mask(rng, 1.0 - rate, shape)
  return jnp.where(keep, x * (1.0 / (1.0 - rate)), jnp.zeros_like(x))


class Dropout(tl.Dropout):
  """`tl.Dropout` (same arguments, state and semantics) with faster masks.

  In predict mode it has no state (trax's holds the rate, which it never
  reads): a decode step then takes fewer arrays (trax's loop passes each).
  """

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      return
    super().init_weights_and_state(input_signature)

  def forward(self, x):
    if self._mode != 'train':
      return x
    # tl.Dropout's state holds the rate as an array and it reads the rate from
    # there only if the state is a dict, which it never is: the rate is fixed.
    return apply_dropout(x, self._initial_rate, self.rng,
                         tuple(self._shared_axes))
