"""Funnel-aware relative attention, the default attention of the hourglass.

Relative attention follows Transformer-XL: the score of query i for key j is
  (q_i + u) . k_j  +  (q_i + v) . W_r sin(rel(i, j)),
with `u` (context bias) and `v` (location bias) shared by every layer of a model.
Queries and keys may live at different lengths (the resampling layers attend from a
shortened sequence to a full one and back), and every relative distance is measured
in the units of the input tokens, i.e. scaled by the keys' accumulated pooling.

The weights of `RelativeAttention` are laid out as in trax's `rel_attention`
(position, query, key, value projections, the two shared biases, the output
projection), so checkpoints of trax's HourglassLM load unchanged. The scores
themselves (positions, sinusoids, masks, logits) are in `relative_scores`.
"""

import functools

import gin
import jax
import numpy as np
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers import base
from trax.layers import initializers as init

from trax_hourglass.layers import blockwise
from trax_hourglass.layers import cache
from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.dropout import apply_dropout
from trax_hourglass.layers import predict_weights
# The scores these layers compute (their public names stay importable here).
from trax_hourglass.layers.relative_scores import _last_key
from trax_hourglass.layers.relative_scores import _position_window
from trax_hourglass.layers.relative_scores import _query_blocks
from trax_hourglass.layers.relative_scores import _tile_logits
from trax_hourglass.layers.relative_scores import block_scores
from trax_hourglass.layers.relative_scores import causal_mask
from trax_hourglass.layers.relative_scores import funnel_ratio
from trax_hourglass.layers.relative_scores import relative_positions
from trax_hourglass.layers.relative_scores import sinusoidal_embeddings
from trax_hourglass.layers.relative_scores import sinusoids_at

_BIAS_INIT_STDDEV = 1e-6
_MASK_VALUE = -1e9


class _Bias(tl.Weights):
  """`tl.Weights` (float32, as trax's) that outputs them cast to `dtype`."""

  def __init__(self, initializer, shape, dtype):
    super().__init__(initializer, shape=shape)
    self._dtype = dtype

  def forward(self, x):
    return super().forward(x).astype(self._dtype)


def RelativeAttentionBiases(d_model, n_heads, dtype='float32'):
  """Returns the (context, location) bias layers that every layer shares.

  Each is a `tl.Weights` of shape (1, n_heads, 1, d_model // n_heads), output
  in `dtype` (the model's compute dtype); placing the same layer object in
  several blocks makes trax store its weights once.
  """
  if d_model % n_heads or d_model % 2:
    raise ValueError(
        f'd_model={d_model} must be even and divisible by n_heads={n_heads}, '
        f'e.g. d_model={n_heads * max(2, 2 * (d_model // (2 * n_heads)))}.')
  shape = (1, n_heads, 1, d_model // n_heads)
  bias_init = init.RandomNormalInitializer(_BIAS_INIT_STDDEV)
  return _Bias(bias_init, shape, dtype), _Bias(bias_init, shape, dtype)


def _raise_past_max_len(n_done, length, max_len):
  cache.raise_past_max_len('RelativeAttention', n_done, length, max_len)


def _split_heads(x, n_heads):
  batch, length, d = x.shape
  return x.reshape(batch, length, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _merge_heads(x):
  batch, n_heads, length, d_head = x.shape
  return x.transpose(0, 2, 1, 3).reshape(batch, length, n_heads * d_head)


class RelativeDotProductAttention(base.Layer):
  """(location_bias, context_bias, pos_emb, q, k, v) -> attended vectors.

  q: (batch, Lq, d_model); k, v: (batch, Lk, d_model); pos_emb: (P, d_model)
  projected embeddings of `relative_positions(Lq, Lk, kv_pooling)`.
  Output: (batch, Lq, d_model), causal across the funnel (see `causal_mask`).
  From `blockwise.MIN_LENGTH` on, train and eval attend tile by tile
  (`blockwise.attention`: memory linear in length); below it, with whole
  blocks of scores (`dense_forward`).
  """

  # `trax_hourglass.attention_maps` sets it on a layer whose weights it reads.
  dense_only = False

  def __init__(self, n_heads, kv_pooling, dropout=0.0, mode='train', factor=1,
               is_upsampling=False, max_inference_length=2048):
    super().__init__(n_in=6, n_out=1, name='RelativeDotProductAttention')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout={dropout} must be in [0, 1).')
    self._n_heads = n_heads
    self._kv_pooling = kv_pooling
    self._dropout = dropout
    self._mode = mode
    # Predict mode sees one query at a time, so it cannot infer the funnel from
    # lengths; it is told, with the longest key sequence to cache.
    self._factor = factor
    self._is_upsampling = is_upsampling
    self._max_keys = max_inference_length

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':  # See `_decode_step`.
      q = input_signature[3]
      batch, n_heads, d_model = q.shape[0], self._n_heads, q.shape[-1]
      # Heads merged into the batch, as the products read them: a write that
      # a reader takes in another shape is repeated, on a copy, for it.
      keys = (batch * n_heads, self._max_keys, d_model // n_heads)
      self.state = (cache.zeros(keys, q.dtype), cache.zeros(keys, q.dtype),
                    jnp.zeros((), jnp.int32))  # Distinct buffers: donatable.

  def forward(self, inputs):
    if self._mode == 'predict':
      return self._decode_step(*inputs)
    q_len, k_len = inputs[3].shape[1], inputs[4].shape[1]
    if blockwise.use_for(q_len, k_len) and not self.dense_only:
      return self._blockwise(*inputs)
    return self.dense_forward(inputs)

  def _blockwise(self, location_bias, context_bias, pos_emb, q, k, v):
    """Tile by tile (`blockwise`): memory linear in length."""
    n_heads = self._n_heads
    q, k, v = (_split_heads(x, n_heads) for x in (q, k, v))
    q_len, k_len = q.shape[2], k.shape[2]
    factor, upsampling = funnel_ratio(q_len, k_len)
    short = min(q_len, k_len)
    pos_emb = pos_emb.reshape(factor, short, n_heads, -1)  # Residue-major.
    q_unit, k_unit = (factor, 1) if upsampling else (1, factor)
    block_q, block_k = blockwise.block_sizes(q_len, k_len, q_unit, k_unit)
    dropout = self._dropout if self._mode == 'train' else 0.0
    spec = blockwise.TileSpec(
        tile_logits=functools.partial(_tile_logits, factor=factor,
                                      is_upsampling=upsampling),
        last_key=functools.partial(_last_key, factor=factor,
                                   is_upsampling=upsampling),
        rel_window=functools.partial(_position_window, short=short,
                                     q_unit=q_unit, k_unit=k_unit),
        dropout=dropout, block_q=block_q, block_k=block_k,
        queries_len=q_len, keys_len=k_len)
    out = blockwise.attention(spec, q, k, v, (context_bias, location_bias),
                              pos_emb, self.rng if dropout else None)
    return _merge_heads(out)

  def dense_forward(self, inputs):
    """The forward pass with whole blocks of scores, through
    `attention_weights` (which `trax_hourglass.attention_maps` reads)."""
    location_bias, context_bias, pos_emb, q, k, v = inputs
    n_heads = self._n_heads
    q, k, v = (_split_heads(x, n_heads) for x in (q, k, v))
    q_len, k_len = q.shape[2], k.shape[2]
    factor, upsampling = funnel_ratio(q_len, k_len)
    short = min(q_len, k_len)
    pos_emb = pos_emb.reshape(factor, short, n_heads, -1)  # Residue-major.
    # Block-causal: a block of queries needs only the keys up to its last
    # query's horizon, so about half of the scores are never computed.
    outputs = []
    for block, (start, stop) in enumerate(
        _query_blocks(q_len, factor if upsampling else 1)):
      grid = stop // factor if upsampling else stop  # Coarse positions seen.
      n_keys = grid if upsampling else stop * factor
      logits = block_scores(q[:, :, start:stop], k[:, :, :n_keys],
                            pos_emb[:, short - grid:], context_bias,
                            location_bias, factor, upsampling)
      mask = causal_mask(np.arange(start, stop), n_keys, factor, upsampling)
      outputs.append(self._attend(logits, mask, v[:, :, :n_keys], block))
    return _merge_heads(jnp.concatenate(outputs, axis=2))

  def _decode_step(self, location_bias, context_bias, pos_proj, q, k, v):
    """One query against the key/value cache, over the keys it can see.

    The state holds the keys and values, (batch * heads, max_keys, d_head).
    Same level: query n's key goes to slot n, key j sits at offset j - n.
    Shortening: the query brings `factor` keys, written from slot f*n (query
    i sits at key f*i). Upsampling: query n = f*a + s rewrites slot a (key j
    summarises queries up to f*j) and sees key j at offset f*(j - a) - s.
    Key j's offset is then first - step * j, first traced.

    pos_proj: (heads, d_model, d_head), the position projection's kernel by
    head (`PositionProjection` in predict mode).
    """
    if q.shape[1] != 1:
      raise ValueError(
          f'Predict mode takes one query per call, got {q.shape[1]}; '
          'HourglassLM feeds longer inputs (prompts) one token at a time.')
    k_cache, v_cache, n_done = self.state
    factor, n_keys, n_heads = self._factor, self._max_keys, self._n_heads
    batch, d_model = q.shape[0], q.shape[-1]
    d_head = d_model // n_heads
    if self._is_upsampling:
      slot, n_visible = n_done // factor, n_done // factor + 1
      first, step, low = -n_done, -factor, -(factor * n_keys - 1)
    else:
      slot, n_visible = n_done * factor, n_done * factor + factor
      first, step = -slot * self._kv_pooling, -self._kv_pooling
      low = -(n_keys - 1) * self._kv_pooling
    past = cache.check_room(slot, k.shape[1], n_keys, _raise_past_max_len)

    def by_head(x):  # (batch, len, d_model) -> (batch * heads, len, d_head)
      return _split_heads(x, n_heads).reshape(batch * n_heads, -1, d_head)

    k_cache = cache.append(k_cache, by_head(k), slot)
    v_cache = cache.append(v_cache, by_head(v), slot)
    self.state = (k_cache, v_cache, n_done + 1)

    scale = 1.0 / np.sqrt(d_head)
    q = _split_heads(q, n_heads)  # (batch, heads, 1, d_head)
    q_content, q_location = (q + context_bias) * scale, (q + location_bias) * scale
    # q . (W s + b) = (W^T q) . s + q . b: the query goes to the sinusoids'
    # space, so no position is projected and none is kept in the state (q . b
    # is the same for every key: softmax ignores it).
    u = jnp.einsum('bnid,nkd->bnik', q_location, pos_proj)
    # Key j = grid * a + c sits at offset first - step * c - step * grid * a:
    # the sinusoid of a sum of a traced fine angle and a static coarse one.
    grid = 64
    fine = sinusoids_at(first - step * jnp.arange(grid), d_model, low,
                        -step * (grid - 1) + (factor - 1) * self._kv_pooling)
    sin_f, cos_f = jnp.split(fine, 2, axis=-1)  # (grid, d_model / 2)
    u_sin, u_cos = jnp.split(u[..., None, :], 2, axis=-1)  # (b, n, 1, 1, d/2)
    # u . s(A + c) = [sin A, cos A] . g[c], as sin(A + c) = sin A cos c +
    # cos A sin c and cos(A + c) = cos A cos c - sin A sin c.
    g = jnp.concatenate([u_sin * cos_f - u_cos * sin_f,
                         u_sin * sin_f + u_cos * cos_f], axis=-1)
    coarse = sinusoidal_embeddings(-step * grid * np.arange(-(-n_keys // grid)),
                                   d_model)

    def location_logits(size):
      return jnp.einsum('ak,bnick->bniac', coarse[:-(-size // grid)],
                        g).reshape(batch * n_heads, 1, -1)[..., :size]

    q_content = q_content.reshape(batch * n_heads, 1, d_head)
    out = cache.attend(
        lambda keys: jnp.einsum('bid,bkd->bik', q_content, keys), k_cache,
        v_cache, n_visible[None], location_logits)
    return cache.nan_if(past, _merge_heads(out.reshape(batch, n_heads, 1,
                                                       d_head)))

  def attention_weights(self, logits, mask, d_head):
    """Softmax weights of logits (batch, heads, C, K), zero where mask is False.

    A method of its own so that `trax_hourglass.attention_maps` reads them.
    """
    dtype = logits.dtype  # The softmax in float32, its weights in dtype.
    logits = logits.astype(jnp.float32) * (1.0 / np.sqrt(d_head))
    logits = jnp.where(mask, logits, _MASK_VALUE)  # mask: a constant.
    return jax.nn.softmax(logits, axis=-1).astype(dtype)

  def _attend(self, logits, mask, values, block):
    """Masked softmax of logits (batch, heads, C, K), dropout, times values."""
    probs = self.attention_weights(logits, mask, values.shape[-1])
    if self._mode == 'train':
      rng = jax.random.fold_in(self.rng, block) if block else self.rng
      probs = apply_dropout(probs, self._dropout, rng)
    return jnp.einsum('bnij,bnjd->bnid', probs, values)


def RelativePositionEmbeddings(d_model, kv_pooling, mode='train'):
  """(queries, keys) -> (P, d_model) sinusoids of the positions they need.

  In predict mode the attention builds them per query (see
  `RelativeDotProductAttention`); this emits a placeholder (1, d_model).
  """
  def embeddings(queries, keys):
    if mode == 'predict':
      return jnp.zeros((1, d_model), queries.dtype)
    positions = relative_positions(queries.shape[1], keys.shape[1], kv_pooling)
    return jnp.asarray(sinusoidal_embeddings(positions, d_model),
                       queries.dtype)
  return tl.Fn('RelativePositionEmbeddings', embeddings)


class PositionProjection(Dense):
  """The projection of position sinusoids: a `Dense`, same weights.

  In predict mode it outputs its kernel by head, (n_heads, d_in, d_out /
  n_heads), and the attention applies it per query (cheaper than projecting
  every offset; the bias adds the same to every key's score, so none).
  """

  def __init__(self, n_units, n_heads, mode='train'):
    super().__init__(n_units)
    self._n_heads = n_heads
    self._mode = mode

  def forward(self, x):
    if self._mode != 'predict':
      return super().forward(x)
    kernel = self.weights[0].astype(x.dtype)  # x: a placeholder in q's dtype.
    # trax's layout (its own decoding loop passes `model.weights`): a copy per
    # call; `decoding.sample` passes the kernel by head (see `predict_weights`).
    by_head = isinstance(self.weights, predict_weights.DecodingLayout)
    return kernel if by_head else self._by_head(kernel)

  def laid_out_for_decoding(self, weights):
    """(kernel by head, bias) in place of (kernel, bias)."""
    kernel, bias = weights
    return self._by_head(jnp.asarray(kernel)), bias

  def _by_head(self, kernel):
    d_in, d_out = kernel.shape
    return kernel.reshape(d_in, self._n_heads, d_out // self._n_heads
                          ).transpose(1, 0, 2)


def RelativeAttention(d_model, n_heads, dropout, mode, context_bias_layer,
                      location_bias_layer, kv_pooling, factor=1,
                      is_upsampling=False, max_inference_length=2048):
  """Returns a layer: (queries_in, keys_in) -> vecs, causal relative attention.

  queries_in: (batch, Lq, d_model); keys_in: (batch, Lk, d_model), one length a
  multiple of the other; output (batch, Lq, d_model). `kv_pooling` is the
  accumulated shortening of keys_in, so distances are counted in input tokens.
  Predict mode (one query per call) needs the funnel spelled out: `factor`
  between the lengths, `is_upsampling` if queries are the longer, and the
  longest key sequence, `max_inference_length`, to cache.
  """
  return tl.Serial(
      tl.Branch(RelativePositionEmbeddings(d_model, kv_pooling, mode),
                tl.Select([0], n_in=2), tl.Select([1], n_in=2),
                tl.Select([1], n_in=2)),  # pos, q_in, k_in, k_in
      tl.Parallel(PositionProjection(d_model, n_heads, mode), Dense(d_model),
                  Dense(d_model), Dense(d_model)),  # pos_emb, q, k, v
      context_bias_layer,
      location_bias_layer,  # location_bias, context_bias, pos_emb, q, k, v
      RelativeDotProductAttention(n_heads, kv_pooling, dropout, mode, factor,
                                  is_upsampling, max_inference_length),  # vecs
      Dense(d_model),  # vecs: (batch, Lq, d_model)
  )


@gin.configurable(module='trax_hourglass')
def RelativeAttentionWrapper(d_feature, n_heads=1, dropout=0.0,
                             max_inference_length=2048, mode='train',
                             context_bias_layer=None, location_bias_layer=None,
                             total_pooling=1):
  """Relative self-attention, as an attention type: vecs -> vecs.

  Same signature as trax's `RelativeAttentionWrapper`, so gin files written for
  trax's HourglassLM keep working; the default attention of `HourglassLM`.
  """
  if context_bias_layer is None or location_bias_layer is None:
    context_bias_layer, location_bias_layer = RelativeAttentionBiases(
        d_feature, n_heads)
  return tl.Serial(
      tl.Select([0, 0]),  # vecs, vecs
      RelativeAttention(d_feature, n_heads, dropout, mode, context_bias_layer,
                        location_bias_layer, total_pooling,
                        max_inference_length=max_inference_length),
  )
