"""Attention block by block, forward and backward: memory linear in length.

FlashAttention-2's schedule (Dao 2023) in plain JAX. The forward pass visits,
for each block of queries, the blocks of keys it may see, keeping a running
row maximum, row sum and output accumulator (online softmax); it saves only
the output and each row's logsumexp. The backward pass (`jax.custom_vjp`)
visits each block of keys and, for it, the blocks of queries that see it,
recomputing each tile's logits: P = exp(s - lse), dP = dO V^T and
dS = P * (dP - rowsum(dO * O)). At most one (block_q, block_k) tile of scores
per head exists at a time.

The kernel is generic over how a tile's logits are computed (`tile_logits`):
dS goes back through that function with `jax.vjp`, so relative attention (its
content and position terms, the shared biases and position embeddings) and
plain dot products share it. Tiles that the causal mask hides entirely are
never visited. Softmax statistics and accumulators are float32 whatever the
inputs' dtype; matrix products run in the inputs' dtype with float32
accumulation; outputs come back in the values' dtype.
"""

import collections

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from trax_hourglass.layers.dropout import bernoulli_mask

# Tile sizes (queries x keys). On a 2-core CPU, one relative attention layer's
# jit forward + backward at length 768 took 2.4x / 2.1x / 1.5x / 1.3x the
# dense time with 768 / 256 / 128 / 64 square tiles, and 1.15x / 1.0x / 1.0x
# (256 / 128 / 64) at 6144: small tiles stay in cache; 128 needs a quarter
# of 64's loop steps at long lengths.
BLOCK_Q = 128
BLOCK_K = 128
# Softmax ignores keys whose logit is this (exp underflows to exactly 0).
_MASK_VALUE = -1e30

# How to compute a tile: everything static that the kernel closes over.
TileSpec = collections.namedtuple('TileSpec', [
    'tile_logits',  # (q_blk, k_blk, shared, rel_win, q_start, k_start) ->
                    # float32 (..., bq, bk) logits, scaled, unmasked.
    'last_key',  # numpy int array of query positions -> the last key each
                 # sees (non-decreasing; key 0 is seen by every query).
    'rel_window',  # (q_start, k_start, bq, bk) -> (start, size) of the
                   # window of `rel` (along axis -3) the tile reads, or None.
    'dropout',  # Attention-probability dropout rate (0: none).
    'block_q', 'block_k',  # Tile sizes, multiples of q_unit / k_unit.
    'queries_len', 'keys_len',  # Unpadded lengths.
])

_REL_AXIS = -3  # `rel` arrays: (..., positions, heads, d_head).


def _round_up(n, unit):
  return -(-n // unit) * unit


def block_sizes(queries_len, keys_len, q_unit=1, k_unit=1, block_q=None,
                block_k=None):
  """Tile sizes: the module defaults, multiples of the units, <= the lengths."""
  block_q = BLOCK_Q if block_q is None else block_q
  block_k = BLOCK_K if block_k is None else block_k
  block_q = max(q_unit, block_q // q_unit * q_unit)
  block_k = max(k_unit, block_k // k_unit * k_unit)
  return (min(block_q, _round_up(queries_len, q_unit)),
          min(block_k, _round_up(keys_len, k_unit)))


def attention(spec, queries, keys, values, shared=(), rel=None, rng=None):
  """Softmax attention of `queries` over `keys`, tile by tile.

  Args:
    spec: a `TileSpec`.
    queries: pytree of arrays (..., queries_len, d), length on axis -2.
    keys: pytree of arrays (..., keys_len, d).
    values: (..., keys_len, d_v).
    shared: pytree every tile reads whole (e.g. biases); gets gradients.
    rel: pytree of arrays (..., positions, heads, d_head) of which a tile reads
      the window `spec.rel_window` gives (e.g. relative position embeddings);
      gets gradients. Or None.
    rng: PRNG key for dropout (used iff spec.dropout > 0).

  Returns:
    (..., queries_len, d_v), in values' dtype.
  """
  return _attention(spec, queries, keys, values, shared, rel, rng)


def _slice(tree, start, size, axis=-2):
  return jax.tree_util.tree_map(
      lambda x: lax.dynamic_slice_in_dim(x, start, size, axis), tree)


def _pad_len(tree, length, axis=-2):
  def pad(x):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)
  return jax.tree_util.tree_map(pad, tree)


def _layout(spec):
  """Static schedule: padded lengths, block counts, visible key blocks."""
  bq, bk = spec.block_q, spec.block_k
  nq = -(-spec.queries_len // bq)
  nk = -(-spec.keys_len // bk)
  last = np.asarray(spec.last_key(np.arange(nq) * bq + bq - 1))
  n_kblocks = np.minimum(last // bk + 1, nk).astype(np.int32)  # Per q block.
  # First query block that sees key block kb: n_kblocks is non-decreasing.
  first_qblock = np.searchsorted(n_kblocks, np.arange(nk) + 1).astype(np.int32)
  return bq, bk, nq, nk, n_kblocks, first_qblock


def _rel_padded(spec, rel):
  """rel padded by a window on each side (see `_rel_win`), and the window size."""
  if rel is None:
    return None, 0
  _, size = spec.rel_window(0, 0, spec.block_q, spec.block_k)
  def pad(x):
    widths = [(0, 0)] * x.ndim
    widths[_REL_AXIS] = (size, size)
    return jnp.pad(x, widths)
  return jax.tree_util.tree_map(pad, rel), size


def _rel_win_start(spec, rel_padded, size, q_start, k_start):
  """Start of a tile's window in the padded rel.

  A window out of range by more than its size holds only offsets that no
  visible (query, key) pair has (masked, or padding); clipping keeps
  dynamic_slice from shifting a window that overlaps the range.
  """
  start, _ = spec.rel_window(q_start, k_start, spec.block_q, spec.block_k)
  n = jax.tree_util.tree_leaves(rel_padded)[0].shape[_REL_AXIS] - 2 * size
  return jnp.clip(start, -size, n) + size


def _mask(spec, q_start, k_start, bq, bk):
  """(bq, bk) bool: the keys each query may see (causal and not padding)."""
  q_pos = q_start + jnp.arange(bq)
  k_pos = k_start + jnp.arange(bk)
  visible = k_pos[None, :] <= spec.last_key(q_pos)[:, None]
  return visible & (k_pos < spec.keys_len)[None, :]


def _dropout_keep(spec, rng, tile, shape):
  return bernoulli_mask(jax.random.fold_in(rng, tile), 1.0 - spec.dropout,
                        shape)


def _tile(spec, q_blk, k_blk, shared, rel_win, q_start, k_start):
  return spec.tile_logits(q_blk, k_blk, shared, rel_win, q_start, k_start)


def _forward(spec, queries, keys, values, shared, rel, rng):
  bq, bk, nq, nk, n_kblocks, _ = _layout(spec)
  queries = _pad_len(queries, nq * bq)
  keys = _pad_len(keys, nk * bk)
  values = _pad_len(values, nk * bk)
  rel_padded, rel_size = _rel_padded(spec, rel)
  lead = values.shape[:-2]
  d_v = values.shape[-1]

  def query_block(qb):
    q_start = qb * bq
    q_blk = _slice(queries, q_start, bq)

    def key_block(kb, carry):
      row_max, row_sum, acc = carry
      k_start = kb * bk
      rel_win = None if rel is None else _slice(
          rel_padded, _rel_win_start(spec, rel_padded, rel_size, q_start,
                                     k_start), rel_size, _REL_AXIS)
      logits = _tile(spec, q_blk, _slice(keys, k_start, bk), shared, rel_win,
                     q_start, k_start)
      logits = jnp.where(_mask(spec, q_start, k_start, bq, bk), logits,
                         _MASK_VALUE)
      new_max = jnp.maximum(row_max, logits.max(axis=-1))
      probs = jnp.exp(logits - new_max[..., None])
      rescale = jnp.exp(row_max - new_max)
      row_sum = row_sum * rescale + probs.sum(axis=-1)
      if spec.dropout:
        keep = _dropout_keep(spec, rng, qb * nk + kb, probs.shape)
        probs = jnp.where(keep, probs * (1.0 / (1.0 - spec.dropout)), 0.0)
      v_blk = lax.dynamic_slice_in_dim(values, k_start, bk, -2)
      acc = acc * rescale[..., None] + jnp.einsum(
          '...qk,...kd->...qd', probs.astype(values.dtype), v_blk,
          preferred_element_type=jnp.float32)
      return new_max, row_sum, acc

    # Key 0 is visible to every query, so after the first tile every row's
    # maximum is finite and exp(-inf - max) = 0 rescales nothing into NaN.
    init = (jnp.full(lead + (bq,), -jnp.inf, jnp.float32),
            jnp.zeros(lead + (bq,), jnp.float32),
            jnp.zeros(lead + (bq, d_v), jnp.float32))
    row_max, row_sum, acc = lax.fori_loop(
        0, jnp.asarray(n_kblocks)[qb], key_block, init)
    out = (acc / row_sum[..., None]).astype(values.dtype)
    return out, row_max + jnp.log(row_sum)

  out, lse = lax.map(query_block, jnp.arange(nq))  # (nq, ..., bq, [d_v])
  out = jnp.moveaxis(out, 0, -3).reshape(lead + (nq * bq, d_v))
  lse = jnp.moveaxis(lse, 0, -2).reshape(lead + (nq * bq,))
  return out, lse


def _attention_fwd(spec, queries, keys, values, shared, rel, rng):
  out, lse = _forward(spec, queries, keys, values, shared, rel, rng)
  res = (queries, keys, values, shared, rel, rng, out, lse)
  return out[..., :spec.queries_len, :], res


def _zeros_f32(tree):
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                tree)


def _add(tree, update):
  return jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), tree,
                                update)


def _add_slice(tree, update, start, axis=-2):
  """tree with `update` added to its slice at `start` along `axis`."""
  def add(x, u):
    size = u.shape[axis]
    part = lax.dynamic_slice_in_dim(x, start, size, axis) + u.astype(x.dtype)
    return lax.dynamic_update_slice_in_dim(x, part, start, axis)
  return jax.tree_util.tree_map(add, tree, update)


def _attention_bwd(spec, res, d_out):
  queries, keys, values, shared, rel, rng, out, lse = res
  bq, bk, nq, nk, _, first_qblock = _layout(spec)
  q_pad = _pad_len(queries, nq * bq)
  k_pad = _pad_len(keys, nk * bk)
  v_pad = _pad_len(values, nk * bk)
  rel_padded, rel_size = _rel_padded(spec, rel)
  d_out = _pad_len(d_out, nq * bq)
  # rowsum(dO * P dropped V) = rowsum(dO * O): dS's correction per row.
  d_row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)

  def key_block(carry, kb):
    k_start = kb * bk
    k_blk = _slice(k_pad, k_start, bk)
    v_blk = lax.dynamic_slice_in_dim(v_pad, k_start, bk, -2)

    def query_block(qb, inner):
      d_queries, d_shared, d_rel, d_k_blk, d_v_blk = inner
      q_start = qb * bq
      q_blk = _slice(q_pad, q_start, bq)
      if rel is None:
        rel_start, rel_win = None, None
      else:
        rel_start = _rel_win_start(spec, rel_padded, rel_size, q_start,
                                   k_start)
        rel_win = _slice(rel_padded, rel_start, rel_size, _REL_AXIS)
      logits, tile_vjp = jax.vjp(
          lambda q, k, s, r: _tile(spec, q, k, s, r, q_start, k_start),
          q_blk, k_blk, shared, rel_win)
      logits = jnp.where(_mask(spec, q_start, k_start, bq, bk), logits,
                         _MASK_VALUE)
      probs = jnp.exp(logits - lax.dynamic_slice_in_dim(
          lse, q_start, bq, -1)[..., None])  # Masked: exactly 0.
      d_out_blk = lax.dynamic_slice_in_dim(d_out, q_start, bq, -2)
      d_probs = jnp.einsum('...qd,...kd->...qk', d_out_blk, v_blk,
                           preferred_element_type=jnp.float32)
      if spec.dropout:
        keep = _dropout_keep(spec, rng, qb * nk + kb, probs.shape)
        scale = 1.0 / (1.0 - spec.dropout)
        dropped = jnp.where(keep, probs * scale, 0.0)
        d_probs = jnp.where(keep, d_probs * scale, 0.0)
      else:
        dropped = probs
      d_v_blk = d_v_blk + jnp.einsum(
          '...qk,...qd->...kd', dropped.astype(d_out.dtype), d_out_blk,
          preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - lax.dynamic_slice_in_dim(
          d_row, q_start, bq, -1)[..., None])
      d_q, d_k, d_s, d_r = tile_vjp(d_logits)
      d_queries = _add_slice(d_queries, d_q, q_start)
      d_shared = _add(d_shared, d_s)
      if rel is not None:
        d_rel = _add_slice(d_rel, d_r, rel_start, _REL_AXIS)
      return d_queries, d_shared, d_rel, _add(d_k_blk, d_k), d_v_blk

    d_queries, d_shared, d_rel = carry
    inner = (d_queries, d_shared, d_rel, _zeros_f32(k_blk),
             jnp.zeros(v_blk.shape, jnp.float32))
    d_queries, d_shared, d_rel, d_k_blk, d_v_blk = lax.fori_loop(
        jnp.asarray(first_qblock)[kb], nq, query_block, inner)
    return (d_queries, d_shared, d_rel), (d_k_blk, d_v_blk)

  init = (_zeros_f32(q_pad), _zeros_f32(shared), _zeros_f32(rel_padded))
  (d_queries, d_shared, d_rel), (d_keys, d_values) = lax.scan(
      key_block, init, jnp.arange(nk))
  return _as_inputs((d_queries, d_keys, d_values, d_shared, d_rel),
                    (queries, keys, values, shared, rel, rng), bk, rel_size)


def _as_inputs(grads, inputs, bk, rel_size):
  """`_attention_bwd`'s float32 padded (and, for keys and values, blocked)
  gradients, in the shapes and dtypes of `inputs`; rng's is float0."""
  d_queries, d_keys, d_values, d_shared, d_rel = grads
  queries, keys, values, shared, rel, rng = inputs

  def unblock(blocks, like):  # (nk, ..., bk, d) -> like's shape and dtype.
    nk = blocks.shape[0]
    x = jnp.moveaxis(blocks, 0, -3)
    x = x.reshape(x.shape[:-3] + (nk * bk, x.shape[-1]))
    return x[..., :like.shape[-2], :].astype(like.dtype)

  def cast(tree, like):
    return jax.tree_util.tree_map(lambda g, x: g.astype(x.dtype), tree, like)

  d_queries = jax.tree_util.tree_map(
      lambda g, x: g[..., :x.shape[-2], :].astype(x.dtype), d_queries, queries)
  d_keys = jax.tree_util.tree_map(unblock, d_keys, keys)
  d_values = unblock(d_values, values)
  if rel is not None:
    d_rel = jax.tree_util.tree_map(
        lambda g, x: lax.slice_in_dim(g, rel_size, rel_size + x.shape[
            _REL_AXIS], axis=x.ndim + _REL_AXIS).astype(x.dtype), d_rel, rel)
  d_rng = None if rng is None else np.zeros(np.shape(rng), jax.dtypes.float0)
  return (d_queries, d_keys, d_values, cast(d_shared, shared), d_rel, d_rng)


def _primal(spec, queries, keys, values, shared, rel, rng):
  out, _ = _forward(spec, queries, keys, values, shared, rel, rng)
  return out[..., :spec.queries_len, :]


_attention = jax.custom_vjp(_primal, nondiff_argnums=(0,))
_attention.defvjp(_attention_fwd, _attention_bwd)


# From this length on (the longer of queries and keys) attention runs block by
# block; below it the layers keep their dense attention, faster there on a
# 2-core CPU: one relative attention layer's jit forward + backward (batch
# 6144 / length, 4 heads of 64, 128 x 128 tiles) took 1.5x the dense time at
# length 768 and 1.0x at 6144, where the dense scores of a whole model near
# 20 GB (12288 asks for 30 GB).
MIN_LENGTH = 6144


def use_for(queries_len, keys_len):
  """Whether attention between these lengths runs block by block."""
  return max(queries_len, keys_len) >= MIN_LENGTH


def skew(x, n_cols):
  """(..., C, C + n_cols - 1) scores by offset -> (..., C, n_cols) by key.

  Transformer-XL's shift for one tile: out[i, j] = x[i, j - i + C - 1], the
  offset of key j from query i once both count from the tile's corner. One
  reshape and one slice of the flattened rows, no gather.
  """
  *lead, rows, cols = x.shape
  if rows == 1:
    return x
  x = x.reshape(*lead, rows * cols)[..., rows - 1:rows - 1 + rows * (cols - 1)]
  return x.reshape(*lead, rows, cols - 1)[..., :n_cols]
