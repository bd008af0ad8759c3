"""Performer (causal FAVOR) attention with a predict mode.

trax's `tl.CausalFavor` ignores `mode`: in predict mode each call would attend
only to the tokens it is given. Causal FAVOR is a running sum over keys, so
decoding needs just that sum in the state: this keeps trax's layer (same
weights, same train/eval computation) and adds it.
"""

import gin
import trax.layers as tl
from trax.fastmath import numpy as jnp

from trax_hourglass.layers.dense import Dense


class CausalFavorAttention(tl.CausalFavorAttention):
  """(q, k, v) per head, (batch*heads, len, d_head) -> (batch*heads, len, d_v).

  train/eval: trax's. predict: continues the prefix sums of relu(k)+eps times
  v (numerator) and of relu(k)+eps (denominator) kept in the state.
  """

  def __init__(self, numerical_stabilizer=0.001, mode='train'):
    super().__init__(numerical_stabilizer=numerical_stabilizer, mode=mode)
    self._stabilizer = numerical_stabilizer

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      q, _, v = input_signature
      self.state = (jnp.zeros((q.shape[0], q.shape[-1], v.shape[-1])),
                    jnp.zeros((q.shape[0], q.shape[-1])))

  def forward(self, inputs):
    if self._mode != 'predict':
      return super().forward(inputs)
    q, k, v = inputs
    q_prime = jnp.maximum(q, 0.0) + self._stabilizer
    k_prime = jnp.maximum(k, 0.0) + self._stabilizer
    numerator, denominator = self.state
    numerator = numerator[:, None] + jnp.cumsum(
        jnp.einsum('blm,bld->blmd', k_prime, v), axis=1)  # (bh, len, m, d)
    denominator = denominator[:, None] + jnp.cumsum(k_prime, axis=1)
    self.state = (numerator[:, -1], denominator[:, -1])
    attended = jnp.einsum('blm,blmd->bld', q_prime, numerator)
    return attended / jnp.einsum('blm,blm->bl', q_prime, denominator)[..., None]


@gin.configurable(module='trax_hourglass')
def CausalFavor(d_feature, n_heads=1, dropout=0.0, numerical_stabilizer=0.001,
                mode='train'):
  """`tl.CausalFavor` (same arguments and weights) that also decodes.

  vecs (batch, len, d_feature) -> vecs. Like trax's, no dropout and no
  positions (HourglassLM adds absolute positions at the embedding).
  """
  del dropout
  return tl.ConfigurableAttention(
      Dense(d_feature), Dense(d_feature), Dense(d_feature),
      Dense(d_feature), n_heads=n_heads,
      qkv_attention_layer=CausalFavorAttention(numerical_stabilizer, mode))
