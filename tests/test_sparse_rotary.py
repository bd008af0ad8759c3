"""Tests of the sparse layers (layers/sparse.py), the rotary attention
(layers/rotary.py); gin/ files using them are built in test_trainer.py.

Models are tiny and shared through module fixtures: the machine has 2 cores.
"""

import re

import gin
import jax
import numpy as np
import pytest

import trax_hourglass
from trax_hourglass import decoding
from trax_hourglass.layers import cache
from trax_hourglass.layers import feed_forward
from trax_hourglass.layers import predict_weights
from trax_hourglass.layers import rotary
from trax_hourglass.layers.rotary import RotaryCausalAttention
from trax_hourglass.layers.sparse import FeedForwardBlock
from trax_hourglass.layers.sparse import VocabProjection

import trax.layers as tl  # pylint: disable=g-bad-import-order (after compat)
from trax import shapes

from configurations import compiled_call  # pylint: disable=g-bad-import-order

D_MODEL, D_FF, VOCAB, N_HEADS, LENGTH = 16, 32, 16, 2, 7


def _shapes(tree):
  return jax.tree_util.tree_map(np.shape, tree)


def _vecs(length=LENGTH, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, length, D_MODEL).astype(
      np.float32)


def _init(layer, x):
  layer.init(shapes.signature(x))
  return layer


def _copy_weights(to_layer, from_layer):
  to_layer.weights = from_layer.weights
  return to_layer


# Sparse feed-forward block and vocabulary projection.


def _ff_block(mode, ff_sparsity):
  return FeedForwardBlock(D_MODEL, D_FF, 0.1, None, mode, tl.Relu,
                          ff_sparsity=ff_sparsity)


@pytest.fixture(scope='module')
def sparse_ff_eval():
  return _init(_ff_block('eval', 4), _vecs())


def test_dense_feed_forward_block_is_feed_forward_residual():
  x = _vecs()
  block = _init(_ff_block('eval', 0), x)
  reference = feed_forward.FeedForwardResidual(D_MODEL, D_FF, 0.1, None, 'eval',
                                             tl.Relu)
  reference = _copy_weights(_init(reference, x), block)
  assert str(block) == str(reference)
  np.testing.assert_array_equal(block(x), reference(x))


def test_sparse_feed_forward_block_weights(sparse_ff_eval):
  # Controller (d_model x d_ff/N, its d_ff/N x d_ff, bias), main (two d_ff-wide
  # matrices, bias), and the LayerNorm; d_ff/N = 8 blocks of N = 4 units.
  leaves = [w.shape for w in jax.tree_util.tree_leaves(sparse_ff_eval.weights)]
  assert leaves == [(16,), (16,), (16, 8), (8, 8, 4), (8, 4), (16, 8, 4),
                    (4, 8, 16), (16,)]


def test_sparse_ff_predict_one_token_at_a_time_matches_eval(sparse_ff_eval):
  x = _vecs()
  expected = sparse_ff_eval(x)
  predict = _copy_weights(_init(_ff_block('predict', 4), x[:, :1]),
                          sparse_ff_eval)
  steps = [(0, 2)] + [(t, t + 1) for t in range(2, LENGTH)]  # 2, then 1 each.
  got = np.concatenate([predict(x[:, a:b]) for a, b in steps], axis=1)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert not np.allclose(expected, x)  # The block did something.


@pytest.mark.parametrize('batch', [1, 8], ids=['gathered', 'read_whole'])
def test_sparse_ff_predict_computes_chosen_units_as_eval(batch):
  # N = 64: one row per call gathers the chosen units' weights; 8 rows read
  # the kernels whole (see sparse._ROWS_PER_DENSE_READ).
  def block(mode):
    return FeedForwardBlock(D_MODEL, 128, 0.0, None, mode, tl.Relu,
                            ff_sparsity=64)
  x = _vecs(batch=batch)
  evaluator = _init(block('eval'), x)
  predict = _copy_weights(_init(block('predict'), x[:, :1]), evaluator)
  got = np.concatenate([predict(x[:, t:t + 1]) for t in range(LENGTH)], 1)
  np.testing.assert_allclose(got, compiled_call(evaluator, x), atol=1e-4)


def _sublayers(layer):
  yield layer
  for sublayer in layer.sublayers:
    yield from _sublayers(sublayer)


@pytest.mark.slow  # ~40 s; test_predict decodes ff_sparsity=4 configurations by default.
def test_sparse_hourglass_every_ff_is_sparse_and_decodes_as_eval():
  # '1@1 1@2 1@1': five feed-forward blocks, one per decoder block (3) and one
  # per attention resampling (2); predict mode gathers the chosen units in all.
  args = dict(vocab_size=VOCAB, d_model=D_MODEL, d_ff=D_FF, n_heads=N_HEADS,
              hierarchy='1@1 1@2 1@1', dropout=0.0, ff_sparsity=4)
  tokens = np.random.RandomState(3).randint(1, VOCAB, size=(1, 6)).astype(
      np.int32)
  evaluator = _init(trax_hourglass.HourglassLM(mode='eval', **args), tokens)
  decoder = _copy_weights(_init(trax_hourglass.HourglassLM(
      mode='predict', max_len=6, **args), tokens[:, :1]), evaluator)
  assert sum(type(layer).__name__ == '_ChosenUnitsFF'
             for layer in _sublayers(decoder)) == 5
  fresh, expected = decoder.state, compiled_call(evaluator, tokens)
  shifted = np.concatenate([np.zeros((1, 1), np.int32), tokens[:, :-1]], 1)
  step = jax.jit(lambda tok, weights, state: decoder.pure_fn(
      tok, weights, state, jax.random.PRNGKey(0)))

  def decode(weights):
    state, logits = fresh, []
    for t in range(6):
      out, state = step(shifted[:, t:t + 1], weights, state)
      logits.append(out)
    return np.concatenate(logits, 1)

  np.testing.assert_allclose(decode(decoder.weights), expected, atol=1e-4)
  # decoding.sample's weights: w1 also unit by unit, made once per kernel.
  weights = predict_weights.decoding_weights(decoder)
  leaves = jax.tree_util.tree_leaves(weights)
  assert len([w for w in leaves if w.shape == (D_FF, D_MODEL)]) == 5
  assert len(leaves) == len(jax.tree_util.tree_leaves(decoder.weights)) + 5
  assert all(a is b for a, b in zip(
      jax.tree_util.tree_leaves(predict_weights.decoding_weights(decoder)), leaves))
  np.testing.assert_allclose(decode(weights), expected, atol=1e-4)
  # decoding.sample, greedy: each token is eval mode's argmax after the others.
  sampled = decoding.sample(decoder, 4, temperature=0)
  np.testing.assert_array_equal(
      sampled[0], np.argmax(compiled_call(evaluator, sampled)[0], axis=-1))


def test_vocab_projection_layouts():
  x = _vecs()
  dense = VocabProjection(VOCAB, D_MODEL)
  assert isinstance(dense, tl.Dense)  # Dense weights: (kernel, bias).
  assert _shapes(_init(dense, x).weights) == ((D_MODEL, VOCAB), (VOCAB,))
  sparse = _init(VocabProjection(VOCAB, D_MODEL, loss_sparsity=4), x)
  # 4 gating vectors, one shared d_model x vocab/4 matrix, a bias.
  leaves = [w.shape for w in jax.tree_util.tree_leaves(sparse.weights)]
  assert leaves == [(4, D_MODEL), (D_MODEL, VOCAB // 4), (VOCAB,)]
  assert sparse(x).shape == (2, LENGTH, VOCAB)


@pytest.mark.parametrize('value', [3, -4, 2.0, True, '4'])
def test_bad_ff_sparsity_raises_naming_it(value):
  with pytest.raises(ValueError, match=re.escape(f'ff_sparsity={value!r}')
                     ) as error:
    _ff_block('train', value)
  if value == 3:  # Names d_ff and a divisor of it that works.
    assert 'd_ff=32' in str(error.value) and 'ff_sparsity=4' in str(error.value)


def test_bad_loss_sparsity_raises_naming_it():
  with pytest.raises(ValueError, match=r'loss_sparsity=5 .*vocab_size=16.*'
                     r'loss_sparsity=4'):
    VocabProjection(VOCAB, D_MODEL, loss_sparsity=5)


# Rotary causal attention.


def _rotary(mode, total_pooling=1, max_inference_length=2048, dropout=0.0):
  return RotaryCausalAttention(D_MODEL, n_heads=N_HEADS, dropout=dropout,
                               max_inference_length=max_inference_length,
                               mode=mode, total_pooling=total_pooling)


@pytest.fixture(scope='module')
def rotary_eval():
  return _init(_rotary('eval', total_pooling=3), _vecs())


def _in_cache_pieces(shape):
  """A cache shape (batch, max_len, d) of tl.CausalAttention's as our pieces'."""
  if len(shape) != 3:
    return shape
  batch, max_len, d = shape
  return tuple((batch, n, d) for n in cache.piece_lengths(max_len))


def test_rotary_weights_and_state_as_causal_attention():
  # Weights (what checkpoints hold) as tl.CausalAttention's. Predict state
  # (never saved) is its tree but keys and values in cache pieces, so that a
  # step's cost follows the position reached, not max_len (issue 19).
  x = _vecs()
  for mode in ('eval', 'predict'):
    ours = _init(_rotary(mode), x)
    causal = _init(tl.CausalAttention(D_MODEL, n_heads=N_HEADS, mode=mode), x)
    assert _shapes(ours.weights) == _shapes(causal.weights)
    want = jax.tree_util.tree_map(
        _in_cache_pieces, _shapes(causal.state),
        is_leaf=lambda s: isinstance(s, tuple) and all(
            isinstance(n, int) for n in s))
    assert _shapes(ours.state) == want


def test_rotary_is_causal(rotary_eval):
  x = _vecs()
  before = rotary_eval(x)
  for t in (0, 3, LENGTH - 1):
    changed = x.copy()
    changed[:, t] += 1.0
    after = rotary_eval(changed)
    np.testing.assert_array_equal(after[:, :t], before[:, :t])
    assert not np.allclose(after[:, t:], before[:, t:])


def _reference_attention(x, weights, n_heads, positions):
  """float64 numpy multi-head causal attention; rotation as complex products.

  Pair i of a head (entries i and i + d/2) is the complex number
  x_i + 1j x_{i+d/2}, turned by exp(1j * position * 10000^(-2i/d)).
  """
  (wq, bq), (wk, bk), (wv, bv), (wo, bo) = [
      (np.float64(w), np.float64(b)) for w, b in _dense_weights(weights)]
  x = np.float64(x)
  batch, length, d_model = x.shape
  d_head = d_model // n_heads
  half = d_head // 2

  def heads(y):
    return y.reshape(batch, length, n_heads, d_head).transpose(0, 2, 1, 3)

  q, k, v = heads(x @ wq + bq), heads(x @ wk + bk), heads(x @ wv + bv)
  turn = np.exp(1j * np.outer(positions, 10000.0 ** (-np.arange(half) / half)))
  qc = (q[..., :half] + 1j * q[..., half:]) * turn
  kc = (k[..., :half] + 1j * k[..., half:]) * turn
  logits = np.real(np.einsum('bnid,bnjd->bnij', qc, np.conj(kc)))
  logits = logits / np.sqrt(d_head)
  logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bnij,bnjd->bnid', probs, v).transpose(0, 2, 1, 3)
  return out.reshape(batch, length, d_model) @ wo + bo


def _dense_weights(weights):
  """The (kernel, bias) pairs of q, k, v and output, in order."""
  leaves = jax.tree_util.tree_leaves(weights)
  return [tuple(leaves[i:i + 2]) for i in range(0, len(leaves), 2)]


def test_rotary_total_pooling_is_rotation_by_scaled_positions(rotary_eval):
  x = _vecs()
  expected = _reference_attention(x, rotary_eval.weights, N_HEADS,
                                  3 * np.arange(LENGTH))
  np.testing.assert_allclose(rotary_eval(x), expected, atol=1e-5)
  # Positions matter: unscaled ones give other outputs.
  unscaled = _reference_attention(x, rotary_eval.weights, N_HEADS,
                                  np.arange(LENGTH))
  assert np.abs(unscaled - expected).max() > 1e-3


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_rotary_predict_matches_eval(rotary_eval, jit):
  x = _vecs()
  expected = rotary_eval(x)
  predict = _copy_weights(
      _init(_rotary('predict', total_pooling=3, max_inference_length=LENGTH + 1),
            x[:, :1]), rotary_eval)
  step = jax.jit(predict.pure_fn) if jit else predict.pure_fn
  for feed in ([(0, 2), (2, 3)] + [(t, t + 1) for t in range(3, LENGTH)],
               [(t, t + 1) for t in range(LENGTH)]):
    state, outputs = predict.state, []
    for a, b in feed:
      out, state = step(x[:, a:b], predict.weights, state, predict.rng)
      outputs.append(out)
    np.testing.assert_allclose(np.concatenate(outputs, 1), expected, atol=1e-4)
  counters = [leaf for leaf in jax.tree_util.tree_leaves(state)
              if np.ndim(leaf) == 0]
  assert counters == [LENGTH]


def test_rotary_predict_past_max_inference_length_raises(rotary_eval):
  x = _vecs()
  predict = _copy_weights(
      _init(_rotary('predict', total_pooling=3, max_inference_length=4),
            x[:, :1]), rotary_eval)
  fresh = predict.state
  message = r'positions 3\.\.4, past max_inference_length=4'
  # Eagerly (trax's Layer.__call__), as a trax LayerError with the message.
  predict(x[:, :3])
  with pytest.raises(Exception, match=message):
    predict(x[:, 3:5])
  # Jitted (as trax decodes): an XlaRuntimeError carrying the ValueError.
  step = jax.jit(predict.pure_fn)
  _, state = step(x[:, :3], predict.weights, fresh, predict.rng)
  with pytest.raises(Exception, match=message) as error:
    out, _ = step(x[:, 3:5], predict.weights, state, predict.rng)
    out.block_until_ready()
  assert isinstance(error.value, RuntimeError), type(error.value)
  # A successful call afterwards clears jax's error token (else it re-raises
  # at the next effects barrier and at exit).
  out, _ = step(x[:, :1], predict.weights, fresh, predict.rng)
  out.block_until_ready()
  jax.effects_barrier()
  # One call longer than the cache is refused before any computation.
  with pytest.raises(Exception, match='more than max_inference_length=4'):
    predict.pure_fn(x[:, :5], predict.weights, fresh, predict.rng)


def test_rotary_predict_past_max_inference_length_gives_nan(rotary_eval,
                                                            monkeypatch):
  # Were the error lost, the outputs still are not plausible garbage.
  monkeypatch.setattr(rotary, '_raise_if_past_cache', lambda *args: None)
  x = _vecs()
  predict = _copy_weights(
      _init(_rotary('predict', total_pooling=3, max_inference_length=4),
            x[:, :1]), rotary_eval)
  assert np.all(np.isfinite(predict(x[:, :3])))
  assert np.all(np.isnan(predict(x[:, 3:5])))


# Training a tiny LM made of the new layers.


def _loss_and_grads(model):
  x = np.random.RandomState(1).randint(1, VOCAB, size=(2, 12)).astype(np.int32)
  model.init(shapes.signature(x))
  weights, state = model.weights, model.state

  def loss_fn(weights, rng):
    logits, _ = model.pure_fn(x, weights, state, rng)
    targets = jax.nn.one_hot(x, VOCAB)
    return -(jax.nn.log_softmax(logits) * targets).sum(-1).mean()

  return weights, jax.jit(jax.value_and_grad(loss_fn))


def test_tiny_lm_of_sparse_and_rotary_layers_trains():
  model = tl.Serial(
      tl.Embedding(VOCAB, D_MODEL),
      tl.Residual(tl.LayerNorm(), _rotary('train', total_pooling=2,
                                          dropout=0.1)),
      _ff_block('train', 4),
      tl.LayerNorm(),
      VocabProjection(VOCAB, D_MODEL, loss_sparsity=4, mode='train'),
  )
  weights, loss_and_grads = _loss_and_grads(model)
  losses = []
  for step in range(3):
    loss, grads = loss_and_grads(weights, jax.random.PRNGKey(step))
    losses.append(float(loss))
    if step == 0:  # Every layer's weights get a gradient.
      for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), leaf.shape
    weights = jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, weights, grads)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_hourglass_with_rotary_attention_runs():
  model = trax_hourglass.HourglassLM(
      VOCAB, d_model=D_MODEL, d_ff=D_FF, vanilla_layers=(1, 1),
      hierarchy='1@2', n_heads=N_HEADS, dropout=0.0, mode='eval',
      vanilla_attn_type=RotaryCausalAttention,
      middle_attn_type=RotaryCausalAttention)
  x = np.random.RandomState(2).randint(0, VOCAB, size=(1, 8)).astype(np.int32)
  logits = _init(model, x)(x)
  assert logits.shape == (1, 8, VOCAB) and np.all(np.isfinite(logits))


# Gin.

def test_new_layers_are_gin_configurable():
  try:
    for name in ('FeedForwardBlock', 'VocabProjection', 'RotaryCausalAttention'):
      gin.parse_config(f"trax_hourglass.{name}.mode = 'eval'")
  finally:
    gin.clear_config()
