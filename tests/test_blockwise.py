"""Blockwise attention against the dense attention it replaces.

Small tiles are forced so that every configuration spans several tiles, with
lengths that are no multiple of a tile.
"""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from trax import shapes

from trax_hourglass.layers import attention
from trax_hourglass.layers import blockwise
from trax_hourglass.layers import rotary

N_HEADS, D_HEAD, BATCH = 2, 4, 2


@pytest.fixture
def small_tiles(monkeypatch):
  def set_tiles(block_q, block_k):
    monkeypatch.setattr(blockwise, 'BLOCK_Q', block_q)
    monkeypatch.setattr(blockwise, 'BLOCK_K', block_k)
  return set_tiles


def _relative_inputs(queries_len, keys_len, seed):
  rng = np.random.RandomState(seed)
  factor, _ = attention.funnel_ratio(queries_len, keys_len)
  d_model = N_HEADS * D_HEAD
  shapes_ = [(1, N_HEADS, 1, D_HEAD), (1, N_HEADS, 1, D_HEAD),
             (factor * min(queries_len, keys_len), d_model),
             (BATCH, queries_len, d_model), (BATCH, keys_len, d_model),
             (BATCH, keys_len, d_model)]
  return [rng.randn(*s).astype(np.float32) for s in shapes_]


def _value_and_grads(fn, inputs, seed):
  """fn(*inputs), and the gradients of a random projection of it."""
  out = fn(*inputs)
  ct = np.random.RandomState(seed + 1).randn(*out.shape).astype(np.float32)
  grads = jax.grad(lambda *x: jnp.sum(fn(*x) * ct),
                   argnums=tuple(range(len(inputs))))(*inputs)
  return out, grads


def _assert_close(blocked, dense):
  (out, grads), (out_ref, grads_ref) = blocked, dense
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=0)
  for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0,
                               err_msg=f'gradient of input {i}')


# (queries_len, keys_len, kv_pooling, block_q, block_k): same level, shortening
# (keys 2, 3 times longer), upsampling (queries 2, 3 times longer).
RELATIVE_CONFIGS = [
    (21, 21, 1, 8, 8),
    (21, 21, 3, 4, 8),
    (10, 20, 1, 4, 6),
    (9, 27, 2, 4, 6),
    (14, 7, 1, 6, 4),
    (27, 9, 3, 6, 4),
]


@pytest.mark.parametrize('config', RELATIVE_CONFIGS, ids=str)
def test_relative_attention_equals_dense(config, small_tiles):
  queries_len, keys_len, kv_pooling, block_q, block_k = config
  small_tiles(block_q, block_k)
  seed = sum(config)
  inputs = _relative_inputs(queries_len, keys_len, seed)
  layer = attention.RelativeDotProductAttention(N_HEADS, kv_pooling,
                                                mode='eval')
  _assert_close(_value_and_grads(layer._blockwise, inputs, seed),  # pylint: disable=protected-access
                _value_and_grads(lambda *x: layer.dense_forward(x), inputs,
                                 seed))


def test_rotary_attention_equals_dense(small_tiles, monkeypatch):
  small_tiles(8, 4)
  rng = np.random.RandomState(0)
  qkv = [rng.randn(BATCH * N_HEADS, 21, D_HEAD).astype(np.float32)
         for _ in range(3)]
  layer = rotary.RotaryDotProductCausalAttention(mode='eval', total_pooling=2)
  layer.init(shapes.signature(tuple(qkv)))

  def run(min_length):
    monkeypatch.setattr(blockwise, 'MIN_LENGTH', min_length)
    return _value_and_grads(lambda *x: layer(x), qkv, 0)
  _assert_close(run(0), run(10**9))


def _plain_spec(length, block, dropout):
  return blockwise.TileSpec(
      tile_logits=lambda q, k, *_: jnp.einsum('bqd,bkd->bqk', q, k),
      last_key=lambda positions: positions, rel_window=None, dropout=dropout,
      block_q=block, block_k=block, queries_len=length, keys_len=length)


def test_dropout_masks_are_the_same_forward_and_backward():
  length, block, rate = 13, 4, 0.3
  rng_key = jax.random.PRNGKey(5)
  data = np.random.RandomState(1)
  qkv = [data.randn(2, length, D_HEAD).astype(np.float32) for _ in range(3)]
  spec = _plain_spec(length, block, rate)
  n_blocks = -(-length // block)
  # The full mask, from the tiles' keys, as the kernel draws them.
  keep = np.zeros((2, n_blocks * block, n_blocks * block), bool)
  for qb in range(n_blocks):
    for kb in range(n_blocks):
      keep[:, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = (
          blockwise._dropout_keep(spec, rng_key, qb * n_blocks + kb,  # pylint: disable=protected-access
                                  (2, block, block)))
  keep = keep[:, :length, :length]

  def dense(q, k, v):
    logits = jnp.einsum('bqd,bkd->bqk', q, k)
    logits = jnp.where(np.tril(np.ones((length, length), bool)), logits,
                       -1e9)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bqk,bkd->bqd', jnp.where(keep, probs / (1 - rate), 0),
                      v)

  blocked = _value_and_grads(
      lambda *x: blockwise.attention(spec, *x[:2], x[2], rng=rng_key), qkv, 0)
  _assert_close(blocked, _value_and_grads(dense, qkv, 0))
  assert 0.1 < 1 - keep[np.tril(np.ones((length, length), bool))[None].repeat(
      2, 0)].mean() < 0.5  # Dropout did drop.


def _largest_intermediate(fn, *args):
  """Elements of the largest value anywhere in fn's jaxpr, loops included."""
  def largest(jaxpr):
    sizes = [0]
    for eqn in jaxpr.eqns:
      sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars
                if hasattr(v.aval, 'shape')]
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if isinstance(sub, jax_core.ClosedJaxpr):
            sizes.append(largest(sub.jaxpr))
          elif isinstance(sub, jax_core.Jaxpr):
            sizes.append(largest(sub))
    return max(sizes)
  return largest(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize('queries_len, keys_len', [(256, 256), (256, 512),
                                                    (512, 256)])
def test_memory_grows_linearly_with_length(queries_len, keys_len, small_tiles):
  """No value of the training step (forward and backward) grows as L^2.

  Doubling the lengths at most doubles the largest intermediate of the
  blockwise pass, while the dense pass's quadruples.
  """
  small_tiles(16, 16)
  layer = attention.RelativeDotProductAttention(N_HEADS, 1, mode='eval')

  def largest(forward, scale):
    inputs = _relative_inputs(queries_len * scale, keys_len * scale, 0)
    loss = lambda *x: jnp.sum(forward(*x))
    return _largest_intermediate(
        jax.value_and_grad(loss, argnums=tuple(range(6))), *inputs)

  blocked = [largest(layer._blockwise, scale) for scale in (1, 2)]  # pylint: disable=protected-access
  dense = [largest(lambda *x: layer.dense_forward(x), scale)
           for scale in (1, 2)]
  assert blocked[1] <= 2 * blocked[0], blocked
  assert dense[1] >= 3.5 * dense[0], dense  # The check can tell.
  # And nothing holds a length x length score matrix.
  assert blocked[1] < BATCH * N_HEADS * queries_len * keys_len, blocked
