"""Causal self-attention with rotary position embeddings (RoFormer, Su et al.
2021), an alternative `vanilla_attn_type` / `middle_attn_type` for HourglassLM.

Queries and keys are rotated by angles proportional to their positions, so their
dot product depends on the positions' difference only. At a level shortened by
`total_pooling`, positions are `total_pooling * arange(len)`: a distance of one
shortened vector counts as the tokens it spans, as at the full-length level.

Weights: the tree of `tl.CausalAttention(d_feature, n_heads)`, nesting included
(q, k, v and output `Dense(d_feature)`, kernel and bias each); rotation adds
none, so checkpoints switch between the two. Predict-mode state: (keys,
values, n_done) as `tl.CausalAttention`'s, cached keys rotated, except that
keys and values are each a tuple of pieces (`cache.zeros`), as relative
attention's, so that a step costs what the position reached costs.
"""

import gin
import jax
import numpy as np
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers import base
from trax.layers.assert_shape import assert_shape

from trax_hourglass.layers import blockwise
from trax_hourglass.layers import cache
from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.dropout import apply_dropout
from trax_hourglass.layers.relative_scores import sinusoids_at

_MASK_VALUE = -1e9
_ROTARY_BASE = 10000.0


def rotary_tables(positions, d_head):
  """(sin, cos) float32 (len(positions), d_head) for `rotate_pairs`.

  Pair i (entries i and i + d_head/2) turns by position * 10000^(-2i/d_head);
  angles are computed in float64: in float32 they are off by up to ~5e-4
  radians at positions ~1e4.
  """
  if d_head % 2:
    raise ValueError(f'Rotary embeddings need an even head size, got {d_head}.')
  half = d_head // 2
  freqs = _ROTARY_BASE ** (-np.arange(half, dtype=np.float64) / half)
  angles = np.asarray(positions, np.float64)[:, None] * freqs[None, :]
  angles = np.concatenate([angles, angles], axis=-1)
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def rotate_pairs(x, sin, cos):
  """Rotates each pair (x[..., i], x[..., i + d/2]) of x (..., len, d)."""
  sin, cos = jnp.asarray(sin, x.dtype), jnp.asarray(cos, x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def _raise_if_past_cache(n_done, length, max_len):
  cache.raise_past_max_len('RotaryCausalAttention', n_done, length, max_len)


class RotaryDotProductCausalAttention(base.Layer):
  """(q, k, v) -> causal attention, q and k rotated by their positions.

  q, k, v: (batch * n_heads, len, d_head), as `tl.SplitIntoHeads` makes them;
  output likewise. The `tl.DotProductCausalAttention` of `RotaryCausalAttention`.
  """

  def __init__(self, dropout=0.0, max_inference_length=2048, mode='train',
               total_pooling=1):
    super().__init__(n_in=3, n_out=1, name='RotaryDotProductCausalAttention')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout={dropout} must be in [0, 1).')
    self._dropout = dropout
    self._max_len = max_inference_length
    self._mode = mode
    self._total_pooling = total_pooling

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      q, k, v = input_signature
      batch = q.shape[0]
      # In pieces (`cache.zeros`): a step reads only those it needs, whole.
      self.state = (cache.zeros((batch, self._max_len, k.shape[-1]), k.dtype),
                    cache.zeros((batch, self._max_len, v.shape[-1]), v.dtype),
                    jnp.zeros((), jnp.int32))

  def _tables(self, n_positions, d_head):
    return rotary_tables(self._total_pooling * np.arange(n_positions), d_head)

  def forward(self, inputs):
    if self._mode == 'predict':
      return self._decode(*inputs)
    q, k, v = inputs
    length = q.shape[1]
    sin, cos = self._tables(length, q.shape[-1])  # Static: numpy constants.
    q, k = rotate_pairs(q, sin, cos), rotate_pairs(k, sin, cos)
    if blockwise.use_for(length, length):  # Memory linear in length.
      dropout = self._dropout if self._mode == 'train' else 0.0
      block_q, block_k = blockwise.block_sizes(length, length)
      spec = blockwise.TileSpec(
          tile_logits=_tile_logits, last_key=lambda positions: positions,
          rel_window=None, dropout=dropout, block_q=block_q, block_k=block_k,
          queries_len=length, keys_len=length)
      return blockwise.attention(spec, q, k, v,
                                 rng=self.rng if dropout else None)
    mask = np.tril(np.ones((length, length), np.bool_))
    return self._attend(q, k, v, mask)

  def _decode(self, q, k, v):
    """Appends k, v (rotated k) to the cache; q attends to what it holds."""
    length = q.shape[1]
    if length > self._max_len:
      raise ValueError(
          f'RotaryCausalAttention got {length} positions in one predict call, '
          f'more than max_inference_length={self._max_len}.')
    k_cache, v_cache, n_done = self.state
    # The overflow policy of `cache`: an error from the host, NaN outputs.
    past = cache.check_room(n_done, length, self._max_len,
                            _raise_if_past_cache)
    # The sin/cos of these positions only (pair i turns by 10000^(-2i/d), as
    # a Transformer-XL sinusoid of d = d_head), not a table over max_len.
    sin, cos = jnp.split(sinusoids_at(
        self._total_pooling * (n_done + jnp.arange(length)), q.shape[-1], 0,
        self._total_pooling * (self._max_len - 1)), 2, axis=-1)
    sin, cos = (jnp.concatenate([x, x], axis=-1) for x in (sin, cos))
    q, k = rotate_pairs(q, sin, cos), rotate_pairs(k, sin, cos)
    k_cache = cache.append(k_cache, k, n_done)
    v_cache = cache.append(v_cache, v, n_done)
    self.state = (k_cache, v_cache, n_done + length)
    q = q * (1.0 / np.sqrt(q.shape[-1]))

    out = cache.attend(lambda keys: jnp.einsum('bid,bjd->bij', q, keys),
                       k_cache, v_cache, n_done + 1 + jnp.arange(length))
    return cache.nan_if(past, out)

  def _attend(self, q, k, v, mask):
    """Softmax of masked q.k / sqrt(d), attention-prob dropout, times v."""
    logits = jnp.einsum('bid,bjd->bij', q, k) * (1.0 / np.sqrt(q.shape[-1]))
    logits = jnp.where(mask[None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    if self._mode == 'train':
      probs = apply_dropout(probs, self._dropout, self.rng)
    return jnp.einsum('bij,bjd->bid', probs, v)


def _tile_logits(queries, keys, shared, rel, q_start, k_start):
  """Scaled dot products (batch, C, K), float32, of rotated q and k."""
  del shared, rel, q_start, k_start  # Rotation placed q and k already.
  logits = jnp.einsum('bid,bjd->bij', queries, keys,
                      preferred_element_type=jnp.float32)
  return logits * (1.0 / np.sqrt(queries.shape[-1]))


@gin.configurable(module='trax_hourglass')
@assert_shape('bld->bld')  # Also nests the weights exactly as tl.CausalAttention.
def RotaryCausalAttention(d_feature, n_heads=1, dropout=0.0,
                          max_inference_length=2048, mode='train',
                          total_pooling=1):
  """Causal multi-head self-attention with rotary positions: vecs -> vecs.

  vecs: (batch, len, d_feature). Positions advance by `total_pooling` per vector.
  `dropout` applies to the attention probabilities, in train mode. In predict
  mode, calls take one or more new positions each, up to
  `max_inference_length` in all. A call past it raises `PastMaxLenError`, a
  ValueError (eagerly wrapped in trax's LayerError; under jit an
  XlaRuntimeError carrying it, when the outputs are read) and its outputs are
  NaN: the policy of every cache of ours (`trax_hourglass.layers.cache`).
  """
  if d_feature % n_heads:
    raise ValueError(
        f'd_feature={d_feature} must be divisible by n_heads={n_heads}.')
  if (d_feature // n_heads) % 2:
    raise ValueError(
        f'Rotary embeddings need an even head size; d_feature={d_feature} / '
        f'n_heads={n_heads} = {d_feature // n_heads}.')
  return tl.ConfigurableAttention(
      Dense(d_feature), Dense(d_feature), Dense(d_feature),
      Dense(d_feature),  # q, k, v and output projections.
      qkv_attention_layer=RotaryDotProductCausalAttention(
          dropout=dropout, max_inference_length=max_inference_length,
          mode=mode, total_pooling=total_pooling),  # per head: (b*n, len, d/n)
      n_heads=n_heads)
