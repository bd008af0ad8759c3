"""The scores of funnel-aware relative attention (`attention.py`'s layers).

The score of query i for key j is
  (q_i + u) . k_j  +  (q_i + v) . W_r sin(rel(i, j)),
Transformer-XL's, with queries and keys possibly at different lengths (one a
multiple `factor` of the other) and every distance in input tokens. Here: the
relative positions and their sinusoids, the causal mask across the funnel,
and the logits of a block of queries (`block_scores`, whole blocks) or of one
tile (`_tile_logits`, for `blockwise.attention`).
"""

import numpy as np
from trax.fastmath import numpy as jnp

from trax_hourglass.layers import blockwise


def funnel_ratio(queries_len, keys_len):
  """Returns (factor, is_upsampling) relating query and key lengths."""
  longer, shorter = max(queries_len, keys_len), min(queries_len, keys_len)
  if longer % shorter:
    raise ValueError(
        f'Attention between lengths {queries_len} (queries) and {keys_len} '
        '(keys) needs one to be a multiple of the other.')
  return longer // shorter, queries_len > keys_len


def relative_positions(queries_len, keys_len, kv_pooling):
  """Relative positions whose embeddings the attention needs, as a flat array.

  Same length (L): offsets -(L-1)..0, scaled by `kv_pooling`.
  Shortening (keys f times longer; query i sits at key f*i): for each offset
  s in [0, f) within a key block, offsets f*(m - (Lq-1)) + s, m in [0, Lq),
  scaled by `kv_pooling`.
  Upsampling (queries f times longer; key j sits at query f*j): for each query
  offset s in [0, f), offsets f*(m - (Lk-1)) - s, m in [0, Lk), in query units
  (unscaled, as trax's HourglassLM measures them; weights stay compatible).
  Laid out residue-major so that each residue is a plain Transformer-XL skew:
  every score costs one dot product, none is computed and thrown away.
  """
  factor, is_upsampling = funnel_ratio(queries_len, keys_len)
  short = min(queries_len, keys_len)
  grid = factor * (np.arange(short) - (short - 1))  # (short,)
  residues = np.arange(factor)[:, None]  # (f, 1)
  if is_upsampling:
    return (grid[None, :] - residues).reshape(-1).astype(np.float64)
  return ((grid[None, :] + residues) * kv_pooling).reshape(-1).astype(np.float64)


def _inverse_frequencies(d_model):
  return 1.0 / (10000 ** (np.arange(0.0, d_model, 2.0) / d_model))


def sinusoidal_embeddings(positions, d_model):
  """Transformer-XL sinusoids of `positions` (P,) -> (P, d_model) float32."""
  angles = np.asarray(positions, np.float64)[:, None] * _inverse_frequencies(
      d_model)[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(
      np.float32)


def sinusoids_at(positions, d_model, low, high, step=64):
  """`sinusoidal_embeddings` of traced int positions (P,) in [low, high].

  By angle addition from float64-exact tables of coarse (multiples of `step`)
  and fine angles: float32 angles would be off by ~5e-4 radians at 1e4.
  """
  coarse = np.arange(low // step, high // step + 1) * step
  # One table, one gather (each a device operation): coarse rows, then fine.
  table = np.concatenate([sinusoidal_embeddings(coarse, d_model),
                          sinusoidal_embeddings(np.arange(step), d_model)])
  hi, lo = positions // step - low // step, positions % step
  rows = jnp.asarray(table)[jnp.stack([hi, len(coarse) + lo], axis=-1)]
  sin_c, cos_c = jnp.split(rows[..., 0, :], 2, axis=-1)
  sin_f, cos_f = jnp.split(rows[..., 1, :], 2, axis=-1)
  return jnp.concatenate([sin_c * cos_f + cos_c * sin_f,
                          cos_c * cos_f - sin_c * sin_f], axis=1)


def causal_mask(query_positions, keys_len, factor=1, is_upsampling=False):
  """(len(query_positions), keys_len) bool: which keys each query may see.

  Same level (factor 1): key j <= query i. Shortening (keys `factor` times
  longer): query i summarises key block i, so keys j with j // f <= i.
  Upsampling (queries longer): key j summarises queries up to f*j, so j <= i // f.
  """
  q = np.asarray(query_positions)[:, None]
  k = np.arange(keys_len)[None, :]
  if is_upsampling:
    return k <= q // factor
  return k // factor <= q


def _skew(x):
  """(..., C, K) scores indexed by offset -> indexed by key (Transformer-XL).

  Row i is query K-C+i; input column m holds its score for offset m-(K-1). The
  output holds at [i, j] the score for key j, i.e. offset j-(K-C+i), taken from
  column j-i+C-1; entries for future keys are garbage, masked later. One pad and
  one reshape, no gather.
  """
  *lead, rows, cols = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
  x = x.reshape(*lead, rows * (cols + 1))
  x = x[..., rows - 1:rows - 1 + rows * cols]
  return x.reshape(*lead, rows, cols)


def block_scores(queries, keys, pos_emb, context_bias, location_bias, factor,
                 is_upsampling):
  """Relative logits of a block of queries that ends where the keys end.

  Args:
    queries: (batch, heads, C, d_head), the last C queries of those that see
      exactly `keys` (C a multiple of `factor` when upsampling).
    keys: (batch, heads, K, d_head), from the first key on.
    pos_emb: (factor, G, heads, d_head) projected embeddings of the last G
      offsets of each residue of `relative_positions`, G the query (shortening
      and same level) or key (upsampling) length at the coarser resolution.
    context_bias: (1, heads, 1, d_head).
    location_bias: (1, heads, 1, d_head).
    factor: funnel factor between queries and keys (1: same level).
    is_upsampling: queries longer than keys.

  Returns:
    (batch, heads, C, K) logits, before scaling and masking.
  """
  batch, n_heads, n_queries, d_head = queries.shape
  content = jnp.einsum('bnid,bnjd->bnij', queries + context_bias, keys)
  q_loc = queries + location_bias
  grid = pos_emb.shape[1]
  if is_upsampling:  # Query i = f*a + s; key j sits at query f*j.
    q_loc = q_loc.reshape(batch, n_heads, n_queries // factor, factor, d_head)
    position = _skew(jnp.einsum('bnasd,sgnd->bnsag', q_loc, pos_emb))
    position = position.transpose(0, 1, 3, 2, 4)  # (b, n, a, s, key)
  else:  # Key c = f*g + s; query i sits at key f*i.
    position = _skew(jnp.einsum('bnid,sgnd->bnsig', q_loc, pos_emb))
    position = position.transpose(0, 1, 3, 4, 2)  # (b, n, query, g, s)
  return content + position.reshape(batch, n_heads, n_queries, grid * (
      1 if is_upsampling else factor))


def _last_key(query_positions, factor, is_upsampling):
  """The last key each query sees: `causal_mask` as a bound."""
  if is_upsampling:
    return query_positions // factor
  return factor * query_positions + factor - 1


def _position_window(q_start, k_start, block_q, block_k, short, q_unit,
                     k_unit):
  """(start, size) of the embeddings (along the grid) a tile's scores use.

  In coarse units (a query or key of the shorter sequence, or one of the
  same-level sequence), a tile's C queries from q0 and K keys from k0 span
  grid positions k0 - q0 - (C - 1) + short - 1 on, C + K - 1 of them; see
  `relative_positions` for the grid.
  """
  q0, n_q = q_start // q_unit, block_q // q_unit
  k0, n_k = k_start // k_unit, block_k // k_unit
  return k0 - q0 - (n_q - 1) + short - 1, n_q + n_k - 1


def _tile_logits(queries, keys, biases, pos_emb, q_start, k_start, factor,
                 is_upsampling):
  """Scaled relative logits (batch, heads, C, K), float32, of one tile.

  queries: (batch, heads, C, d_head); keys: (batch, heads, K, d_head);
  biases: (context, location), each (1, heads, 1, d_head); pos_emb:
  (factor, C' + K' - 1, heads, d_head), the window `_position_window` gives.
  The position term of each residue is a skewed product (see `blockwise.skew`).
  """
  del q_start, k_start  # The window says where the tile is.
  context_bias, location_bias = biases
  batch, n_heads, n_queries, d_head = queries.shape
  n_keys = keys.shape[2]
  content = jnp.einsum('bnid,bnjd->bnij', queries + context_bias, keys,
                       preferred_element_type=jnp.float32)
  q_loc = queries + location_bias
  if is_upsampling:  # Query i = f*a + s; key j sits at query f*j.
    q_loc = q_loc.reshape(batch, n_heads, n_queries // factor, factor, d_head)
    position = blockwise.skew(jnp.einsum(
        'bnasd,swnd->bnsaw', q_loc, pos_emb,
        preferred_element_type=jnp.float32), n_keys)
    position = position.transpose(0, 1, 3, 2, 4)  # (b, n, a, s, key)
  else:  # Key c = f*g + s; query i sits at key f*i.
    position = blockwise.skew(jnp.einsum(
        'bnid,swnd->bnsiw', q_loc, pos_emb,
        preferred_element_type=jnp.float32), n_keys // factor)
    position = position.transpose(0, 1, 3, 4, 2)  # (b, n, query, g, s)
  logits = content + position.reshape(batch, n_heads, n_queries, n_keys)
  return logits * (1.0 / np.sqrt(d_head))


def _query_blocks(length, unit=1, min_block=64, max_blocks=4):
  """Static (start, stop) query blocks, multiples of `unit`, >= min_block each."""
  units = length // unit
  n_blocks = max([n for n in range(1, max_blocks + 1)
                  if units % n == 0 and units // n * unit >= min_block] or [1])
  size = units // n_blocks * unit
  return [(i * size, (i + 1) * size) for i in range(n_blocks)]
