"""Dynamic pooling ("Efficient Transformers with Dynamic Token Pooling", Nawrot
et al. 2023): segment boundaries, segment-mean shortening and upsampling.

Positions are a level's input positions: position t holds the previous token
(the model's TokenShift) and predicts token t. ends[t] = 1 means "a segment
ends after position t". With closed[t] = cumsum(ends)[t], the segments closed
by t:
  * shortening: z[0] is a learned null vector; z[j] is the mean of the
    vectors of segment j-1 (its positions: those with closed[t] - ends[t] =
    j-1), for j = 1 .. S-1; segments from S-1 on are not pooled;
  * upsampling: position t takes out[min(closed[t], S-1)], the shortened
    layers' output at the latest segment closed at t or before: out[j]
    depends on z[0..j], i.e. on positions <= t. Past the static bound S a
    position keeps out[S-1] (stale, never from the future).
S = 1 + ceil(shortened_bound * max_len / k) for a level of target segment
length k in a model of `max_len`, in every mode: the bound is the model's, not
the input's, so a position reads the same shortened vector whatever follows
it (eval on a prefix agrees with eval on the whole; predict mode, which sees
one token at a time, agrees with both). An input of len tokens closes at most
len segments, so its shortened sequence holds min(S, len + 1) vectors
(`pooled_length`): a static shape under jit.
"""

import math

import gin
import jax
import numpy as np
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers import base
from trax.layers import initializers as init

from trax_hourglass.layers import segmentation
from trax_hourglass.layers.dense import Dense

KINDS = ('fixed', 'whitespace', 'entropy', 'gumbel', 'unigram', 'router')
LEARNED = ('entropy', 'gumbel', 'unigram', 'router')
# ASCII space, tab, CR, LF: the byte ids that end a word.
WHITESPACE_TOKENS = tuple(segmentation.WHITESPACE)
# The shortened length holds up to twice the target number of segments.
SHORTENED_BOUND = 2.0
# Gumbel-sigmoid temperature, and how many earlier positions an entropy spike
# must exceed: the authors' values.
GUMBEL_TEMPERATURE = 0.5
ENTROPY_SPIKES = 2
# The key of gumbel's noise outside training (`position_noise`).
GUMBEL_EVAL_SEED = 0
# The router's ratio loss weight (H-Net's alpha; see `layers.router`).
RATIO_LOSS_WEIGHT = 0.03


def shortened_length(length, target_segment_length, bound=SHORTENED_BOUND):
  """S: the null vector and up to ceil(bound * length / k) segments."""
  return 1 + math.ceil(bound * length / target_segment_length)


def pooled_length(length, max_len, target_segment_length,
                  bound=SHORTENED_BOUND):
  """The shortened sequence's length for an input of `length` tokens.

  min(S, length + 1) with S = `shortened_length(max_len, k, bound)`: the
  bound of the model (its max_len), capped at what `length` tokens can close.
  """
  return min(shortened_length(max_len, target_segment_length, bound),
             length + 1)


def upsampled_segment(closed, n_shortened):
  """The shortened position each position reads: its latest closed segment.

  closed: (batch, len) ints, segments closed at or before each position ->
  (batch, len) indices into the shortened outputs (batch, n_shortened, d).
  """
  return jnp.minimum(closed, n_shortened - 1)


def segment_means(vecs, ends, n_segments):
  """Mean vector of each of the first n_segments segments.

  vecs (batch, len, d), ends (batch, len) 0/1 floats -> (batch, n_segments, d);
  a segment without positions (past the last boundary) is 0. Later segments
  are dropped. Each position's weight is 1 whose gradient is that of its
  segment index in `ends`, as the authors' membership matrix: a straight-
  through `ends` (Gumbel) is trained through the means.
  """
  opened = jnp.cumsum(ends, axis=1) - ends  # Segment index, differentiably.
  segment = jax.lax.stop_gradient(opened).astype(jnp.int32)
  weight = 1.0 + opened - jax.lax.stop_gradient(opened)

  def sums(x):  # Per example; indices >= n_segments are dropped.
    return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, n_segments))(
        x, segment)

  totals = sums(vecs * weight[..., None].astype(vecs.dtype))
  counts = sums(weight)
  return totals / (counts[..., None].astype(vecs.dtype) + 1e-9)


class SegmentPooling(base.Layer):
  """(vecs (batch, len, d), ends (batch, len)) -> short (batch, S', d).

  short[:, 0] is the learned null vector (a weight of shape (d,)), short[:,
  j] the mean of segment j-1 (`segment_means`); S' = `pooled_length(len,
  max_len, k, bound)` for the level's target segment length k.
  """

  def __init__(self, target_segment_length, bound=SHORTENED_BOUND,
               max_len=2048):
    super().__init__(n_in=2, n_out=1, name='SegmentPooling')
    self._k = target_segment_length
    self._bound = bound
    self._max_len = max_len

  def init_weights_and_state(self, input_signature):
    d = input_signature[0].shape[-1]
    self.weights = init.RandomNormalInitializer(1.0)((d,), self.rng)

  def forward(self, inputs):
    vecs, ends = inputs
    batch, length, d = vecs.shape
    n_short = pooled_length(length, self._max_len, self._k, self._bound)
    null = jnp.broadcast_to(self.weights.astype(vecs.dtype), (batch, 1, d))
    return jnp.concatenate([null, segment_means(vecs, ends, n_short - 1)],
                           axis=1)


def SegmentUpsampling():
  """(short (batch, S, d), ends (batch, len)) -> (batch, len, d).

  Position t takes short[min(closed[t], S-1)] (`upsampled_segment`). No
  gradient reaches `ends` here: in the authors' normalised membership it
  vanishes too (one member per row).
  """
  def upsample(short, ends):
    closed = jnp.cumsum(jax.lax.stop_gradient(ends), axis=1).astype(jnp.int32)
    index = upsampled_segment(closed, short.shape[1])
    return jnp.take_along_axis(short, index[..., None], axis=1)
  return tl.Fn('SegmentUpsampling', upsample)


def WhitespaceBoundaries(boundary_tokens=WHITESPACE_TOKENS):
  """(vecs, toks (batch, len)) -> (vecs, ends): ends[t] = toks[t] is one of them.

  toks are the level's input tokens (the shifted ones: position t holds
  token t-1), so a segment ends after each boundary token.
  """
  tokens = np.asarray(boundary_tokens, np.int32)

  def ends(vecs, toks):
    return vecs, jnp.isin(toks, tokens).astype(jnp.float32)
  return tl.Fn('WhitespaceBoundaries', ends, n_out=2)


def position_noise(positions, seed=GUMBEL_EVAL_SEED):
  """Logistic noise fixed by each position: (len,) ints -> (len,) floats.

  Gumbel's boundaries outside training: eval mode and predict mode draw the
  same noise at the same position, so decoding reproduces eval exactly.
  """
  key = jax.random.PRNGKey(seed)
  return jax.vmap(lambda t: jax.random.logistic(jax.random.fold_in(key, t)))(
      positions)


class HardBoundaries(base.Layer):
  """Boundary logits (batch, len) -> (ends, aux): 0/1 ends and the loss's input.

  entropy, unigram: ends = sigmoid(logits) > 0.5; aux = the logits (the loss
  is a binary cross-entropy on them). gumbel: ends = hard Gumbel-sigmoid,
  sigmoid((logits + noise) / temperature) > 0.5 with logistic noise, and in
  training a straight-through gradient; aux = ends (the loss is a Binomial
  prior on their sum). Training draws fresh noise; eval and predict draw
  `position_noise` of each position (predict mode counts positions in its
  state), so that they sample boundaries as training does: a threshold alone
  fires nowhere while the predictor still gives every position p < 0.5 (p
  near 1/k under the prior), and pools nothing. Once the predictor is
  confident the noise rarely changes a decision.
  """

  def __init__(self, kind, mode='train', temperature=GUMBEL_TEMPERATURE):
    super().__init__(n_in=1, n_out=2, name=f'HardBoundaries({kind})')
    self._kind = kind
    self._mode = mode
    self._temperature = temperature

  def init_weights_and_state(self, input_signature):
    if self._kind == 'gumbel' and self._mode == 'predict':
      self.state = jnp.zeros((), jnp.int32)  # Positions seen.

  def forward(self, logits):
    if self._kind != 'gumbel':
      return (logits > 0).astype(jnp.float32), logits  # sigmoid > 0.5
    if self._mode == 'train':
      uniform = jax.random.uniform(self.rng, logits.shape, minval=1e-6,
                                   maxval=1 - 1e-6)
      noise = jnp.log(uniform) - jnp.log1p(-uniform)  # Logistic.
      soft = jax.nn.sigmoid((logits + noise) / self._temperature)
      hard = (soft > 0.5).astype(soft.dtype)
      hard = hard - jax.lax.stop_gradient(soft) + soft
      return hard, hard
    start = self.state if self._mode == 'predict' else 0
    length = logits.shape[1]
    if self._mode == 'predict':
      self.state = start + length
    noise = position_noise(start + jnp.arange(length))
    hard = (logits + noise[None] > 0).astype(jnp.float32)  # As training's.
    return hard, hard


def BoundaryPredictor(kind, d_ff, ff_activation=tl.FastGelu, mode='train'):
  """(vecs (batch, len, d), toks) -> (vecs, ends (batch, len), aux).

  An MLP on each position's vector: Dense(d_ff), activation, Dense(1), then
  `HardBoundaries`. Causal: ends[t] reads position t only.
  """
  return tl.Serial(
      tl.Select([0, 0], n_in=2),  # vecs, vecs (the tokens are not needed)
      Dense(d_ff), ff_activation(), Dense(1),  # logits: (batch, len, 1), vecs
      tl.Fn('Squeeze', lambda x: x[..., 0]),  # logits: (batch, len), vecs
      HardBoundaries(kind, mode),  # ends, aux, vecs
      tl.Select([2, 0, 1]),  # vecs, ends, aux
      name=f'BoundaryPredictor({kind})')


def _entropy_spikes(logits, spikes=ENTROPY_SPIKES):
  """(batch, len, vocab) -> (batch, len) 0/1: entropy above the previous `spikes`.

  Positions with fewer predecessors compare with those they have (the
  authors' rule).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  spike = jnp.ones(entropy.shape, bool)
  for i in range(1, spikes + 1):
    higher = entropy[:, i:] > entropy[:, :-i]
    spike = spike.at[:, i:].set(spike[:, i:] & higher)
  return spike.astype(jnp.float32)


def _unigram_targets(toks, model_path):
  """The SentencePiece pieces of toks (batch, len), at the input positions.

  Host side (`segmentation.unigram_boundaries` through jax.pure_callback):
  position t holds token t-1, so the tokens are shifted as the model's input.
  """
  shifted = jnp.pad(toks, ((0, 0), (1, 0)))[:, :-1]
  pieces = jax.pure_callback(
      lambda t: np.asarray(segmentation.unigram_boundaries(t, model_path), bool),
      jax.ShapeDtypeStruct(toks.shape, jnp.bool_), shifted)
  return pieces.astype(jnp.float32)


def _binary_cross_entropy(logits, targets):
  """Mean binary cross-entropy of sigmoid(logits) against 0/1 targets."""
  return jnp.mean(jnp.maximum(logits, 0) - logits * targets +
                  jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _binomial_prior(ends, rate):
  """-log Binomial(sum ends; n=len, p=rate) / len, averaged over the batch."""
  n = ends.shape[1]
  count = jnp.sum(ends, axis=1)
  log_prob = (jax.scipy.special.gammaln(n + 1.0) -
              jax.scipy.special.gammaln(count + 1) -
              jax.scipy.special.gammaln(n - count + 1) +
              count * math.log(rate) + (n - count) * math.log1p(-rate))
  return -jnp.mean(log_prob) / n


@gin.configurable(module='trax_hourglass', denylist=['p', 'factor'])
def ratio_loss(p, factor, weight=RATIO_LOSS_WEIGHT):
  """H-Net's ratio loss toward 1/factor chunk starts, times its weight.

  p (batch, len), the router's -> (): N/(N-1) ((1-F)(1-G) + (N-1) F G), F the
  share of chunk starts (p > 0.5, no gradient), G the mean p, N the factor;
  1 at F = G = 1/N, the least for a given F. Gin:
  `trax_hourglass.ratio_loss.weight = 0.03`.
  """
  n = float(factor)
  share = jnp.mean((jax.lax.stop_gradient(p) > 0.5).astype(jnp.float32))
  mean_p = jnp.mean(p)
  return weight * n / (n - 1) * ((1 - share) * (1 - mean_p) +
                                 share * mean_p * (n - 1))


def BoundaryLoss(kind, target_segment_length, sentencepiece_model=None):
  """(logits (batch, len', V), aux (batch, len'), toks (batch, len)) ->
  (logits (batch, len, V), boundary_loss ()).

  Crops to the input length and computes the boundary predictor's loss over
  it: entropy: binary cross-entropy toward the spikes of the logits' entropy;
  unigram: toward the SentencePiece pieces of the tokens; gumbel: the
  Binomial prior with rate 1/k on the number of boundaries; router: H-Net's
  `ratio_loss` toward 1/k chunk starts (aux: the router's p). Targets carry
  no gradient.
  """
  def loss(logits, aux, toks):
    length = toks.shape[1]
    logits, aux = logits[:, :length], aux[:, :length]
    if kind == 'gumbel':
      return logits, _binomial_prior(aux, 1.0 / target_segment_length)
    if kind == 'router':
      return logits, ratio_loss(aux, target_segment_length)
    if kind == 'entropy':
      targets = _entropy_spikes(logits)
    else:
      targets = _unigram_targets(toks, sentencepiece_model)
    return logits, _binary_cross_entropy(aux, jax.lax.stop_gradient(targets))
  return tl.Fn(f'BoundaryLoss({kind})', loss, n_out=2)


@gin.configurable(module='trax_hourglass')
def LossWithBoundaries():
  """The training loss of a model with learned boundaries.

  (logits (batch, len, V), boundary_loss (), targets (batch, len), weights)
  -> cross-entropy + boundary_loss. `trainer` binds it as `train.loss_fn`
  (and `boundary_metrics()` as `train.metrics`) when the model's boundaries
  are learned.
  """
  return tl.Serial(
      tl.Select([0, 2, 3, 1]),  # logits, targets, weights, boundary_loss
      tl.WeightedCategoryCrossEntropy(),  # cross-entropy, boundary_loss
      tl.Add(), name='LossWithBoundaries')


@gin.configurable(module='trax_hourglass')
def boundary_metrics():
  """Eval metrics of a model with learned boundaries, by name.

  Each takes (logits, boundary_loss, targets, weights): 'loss' is the
  cross-entropy alone (comparable with other models), 'boundary_loss' the
  predictor's term reported separately.
  """
  def of_logits(metric):
    return tl.Serial(tl.Select([0, 2, 3], n_in=4), metric)
  return {
      'loss': of_logits(tl.WeightedCategoryCrossEntropy()),
      'accuracy': of_logits(tl.WeightedCategoryAccuracy()),
      'boundary_loss': tl.Select([1], n_in=4),
  }
