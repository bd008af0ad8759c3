"""H-Net's dynamic chunking (Hwang, Wang, Gu 2025, `goombalab/hnet`,
`hnet/modules/dc.py`): the router, chunk selection and EMA dechunking.

Positions are a level's input positions, as in `layers.boundaries`. The router
marks chunk STARTS: p[t] = (1 - cos(W_q v[t-1], W_k v[t])) / 2, p[0] = 1, and
a chunk starts at t when p[t] > 0.5. A chunk's vector is that of its first
position, so position t may read its own chunk (chunk[t] = cumsum(starts)[t]
- 1): the shortened layers' output at chunk j depends on positions <= its
start. As for segments, the chunks pooled are bounded by S =
`boundaries.shortened_length(max_len, k, bound)` (chunks from S on are not
pooled; their positions keep the output of chunk S-1), and an input of len
tokens shortens to min(S, len) vectors: a static shape.
"""

import jax
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers import base

from trax_hourglass.layers.boundaries import SHORTENED_BOUND
from trax_hourglass.layers.boundaries import shortened_length

# The clamp of p in the EMA (H-Net's: p = 1 would forget the past chunks,
# p = 0 never take the new one).
EMA_CLAMP = 1e-4


class RouterBoundaries(base.Layer):
  """(vecs (batch, len, d), toks) -> (vecs, p (batch, len), p): the router.

  p[t] = (1 - cos(W_q v[t-1], W_k v[t])) / 2 in float32, how far position
  t's vector turns from the previous one (the previous position takes W_q,
  the current one W_k, as in H-Net's dc.py); p[0] = 1: the first position
  always starts a chunk. Weights (W_q, W_k), (d, d) each, start at the
  identity (H-Net's init). The second p is the boundary loss's input.
  Predict mode keeps the previous vector (batch, d) and the positions seen.
  """

  def __init__(self, mode='train'):
    super().__init__(n_in=2, n_out=3, name='RouterBoundaries')
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    batch, _, d = input_signature[0].shape
    eye = jnp.eye(d, dtype=jnp.float32)
    self.weights = (eye, eye)
    if self._mode == 'predict':
      self.state = (jnp.zeros((batch, d), jnp.float32),
                    jnp.zeros((), jnp.int32))

  def forward(self, inputs):
    vecs, _ = inputs
    w_q, w_k = self.weights
    x = vecs.astype(jnp.float32)
    length = x.shape[1]
    if self._mode == 'predict':
      last, start = self.state
      previous = jnp.concatenate([last[:, None], x[:, :-1]], axis=1)
      self.state = (x[:, -1], start + length)
    else:
      previous, start = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1], 0
    q, k = _unit(previous @ w_q), _unit(x @ w_k)
    p = jnp.clip((1 - jnp.sum(q * k, axis=-1)) / 2, 0.0, 1.0)
    first = (start + jnp.arange(length)) == 0
    p = jnp.where(first[None], 1.0, p)
    return vecs, p, p


def _unit(x):
  """x / |x| along the last axis; 0 stays 0 with a gradient of 0 (the norm's
  own gradient at 0 is NaN, and jnp.where downstream would not stop it)."""
  squares = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squares, 1e-24))


def chunk_index(p):
  """(batch, len) router p -> (starts (batch, len) bool, chunk (batch, len)).

  chunk[t]: the chunk holding position t, from 0 (p[0] = 1 starts chunk 0).
  """
  starts = jax.lax.stop_gradient(p) > 0.5
  return starts, jnp.cumsum(starts, axis=1).astype(jnp.int32) - 1


class ChunkSelection(base.Layer):
  """(vecs (batch, len, d), p (batch, len)) -> short (batch, S', d).

  short[j] is the vector at the start of chunk j, for j < S' = min(S, len),
  S = `shortened_length(max_len, k, bound)`; chunks from S on are not pooled
  and rows past the last chunk are 0. No weights.
  """

  def __init__(self, target_segment_length, bound=SHORTENED_BOUND,
               max_len=2048):
    super().__init__(n_in=2, n_out=1, name='ChunkSelection')
    self._k = target_segment_length
    self._bound = bound
    self._max_len = max_len

  def forward(self, inputs):
    vecs, p = inputs
    length = vecs.shape[1]
    n_short = min(shortened_length(self._max_len, self._k, self._bound),
                  length)
    starts, chunk = chunk_index(p)
    index = jnp.where(starts, chunk, n_short)  # Dropped: not a start, or >= S.
    return jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, n_short))(
        vecs * starts[..., None].astype(vecs.dtype), index)


def ema_step(z, out, p):
  """H-Net's smoothing of one chunk: p * out + (1 - p) * z, p clamped.

  z, out (..., d), p (...,) -> (..., d).
  """
  p = jnp.clip(p, EMA_CLAMP, 1 - EMA_CLAMP)[..., None].astype(out.dtype)
  return p * out + (1 - p) * z


def ChunkUpsampling():
  """(out (batch, S', d), p (batch, len)) -> (batch, len, d): H-Net's dechunk.

  z[j] = `ema_step`(z[j-1], out[j], p_j) (z[-1] = 0), p_j the router's p at
  chunk j's start; position t takes z[min(chunk[t], S'-1)]. The gradient
  reaches p through the EMA.
  """
  def upsample(out, p):
    n_short = out.shape[1]
    starts, chunk = chunk_index(p)
    index = jnp.where(starts, chunk, n_short)
    p_chunk = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, n_short))(
        p * starts.astype(p.dtype), index)  # (batch, S'); 0 past the last.
    p_chunk = jnp.clip(p_chunk, EMA_CLAMP, 1 - EMA_CLAMP)[..., None]
    decay = (1 - p_chunk).astype(out.dtype)
    inject = p_chunk.astype(out.dtype) * out

    def combine(a, b):  # z = decay * z_before + inject, composed.
      return a[0] * b[0], b[0] * a[1] + b[1]
    _, z = jax.lax.associative_scan(combine, (decay, inject), axis=1)
    index = jnp.minimum(chunk, n_short - 1)
    return jnp.take_along_axis(z, index[..., None], axis=1)
  return tl.Fn('ChunkUpsampling', upsample)


def confidence(p):
  """H-Net's straight-through confidence: 1, with the gradient of max(p, 1-p)."""
  c = jnp.maximum(p, 1 - p)
  return 1.0 + c - jax.lax.stop_gradient(c)


def Confidence():
  """(up (batch, len, d), p (batch, len)) -> up * `confidence`(p)."""
  return tl.Fn('Confidence', lambda up, p: up * confidence(p)[..., None].astype(
      up.dtype))
