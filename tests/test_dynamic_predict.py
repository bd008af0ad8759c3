"""Predict mode of dynamic pooling: incremental decoding equals eval mode.

Feeding 0, x0, x1, ... to HourglassLM(mode='predict', boundaries=...) must give
the eval-mode logits of x at every position, for every boundary kind, with a
batch whose sequences close segments at different tokens (at the first
position, at consecutive positions, past the bound S), token by token and
through prompts; the shortened layers step once per closed segment (plus the
null vector), not every token; `decoding.sample` and `hourglass-sample` work on
a dynamic model's checkpoint.
"""

import functools
import re

import gin
import jax
import numpy as np
import pytest
import trax.layers as tl
from trax import shapes
from trax.data import inputs as trax_inputs

import trax_hourglass as th
from trax_hourglass import decoding
from trax_hourglass.cli import sample as sample_cli
from trax_hourglass.layers import boundaries as dynamic
import configurations  # pylint: disable=g-bad-import-order
from configurations import compiled_call  # pylint: disable=g-bad-import-order
from configurations import ATTENTION  # pylint: disable=g-bad-import-order
from test_dynamic_pooling import _sentencepiece_model  # pylint: disable=g-bad-import-order

VOCAB, LENGTH, BATCH = 12, 16, 3
# 0 is the start token: with it a boundary, every sequence closes a segment
# at its first position (null vector and first mean in one step).
SPACES = (0, 3)
KINDS = ('whitespace', 'entropy', 'gumbel', 'unigram')
# S = 1 + ceil(BOUND * LENGTH / 3) = 5: four segments pooled, later ones not.
BOUND = 0.7
# Random weights (test data) whose predictor closes segments of _tokens()'s
# rows at various rates, at the first position (seed 7) or not (gumbel's
# seed 112, with its position noise).
SEEDS = {'whitespace': 0, 'entropy': 7, 'gumbel': 112, 'unigram': 7}
# Decoding calls: the first token alone, then the rest as a prompt (lax.scan).
CHUNKS = [1, LENGTH - 1]


@functools.lru_cache(maxsize=None)
def _pair(kind, hierarchy='1@3', vanilla=(1, 1), bound=BOUND, seed=None,
          middle_attn='relative'):
  """(eval model, predict model) with the same random weights at scale 0.5.

  Scale 0.5 (not trax's init) makes the learned predictors fire often and
  every position term count.
  """
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2, dropout=0.0,
              hierarchy=hierarchy, vanilla_layers=vanilla, boundaries=kind,
              boundary_tokens=SPACES, shortened_bound=bound, max_len=LENGTH,
              middle_attn_type=ATTENTION[middle_attn],
              sentencepiece_model=(_sentencepiece_model() if kind == 'unigram'
                                   else None))
  evaluator = th.HourglassLM(mode='eval', **args)
  evaluator.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  evaluator.weights = configurations.redrawn(
      evaluator.weights, SEEDS[kind] if seed is None else seed)
  decoder = th.HourglassLM(mode='predict', **args)
  decoder.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  decoder.weights = evaluator.weights  # Same tree, loads unchanged.
  return evaluator, decoder


# Per decoder: its state before any token, where each decoding starts, and
# one jitted step, so that tests decoding the same shapes compile them once.
_FRESH, _FAST = {}, {}


def _tokens():
  """Row 0: mostly boundaries, runs of them (past the bound); row 1: few."""
  rng = np.random.RandomState(1)
  tokens = rng.randint(4, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
  tokens[0, [0, 1, 2, 4, 5, 7, 8, 9, 11, 13]] = 3
  tokens[1, [6, 7]] = 3
  tokens[2] = rng.randint(1, VOCAB, size=LENGTH)
  return tokens


def _eval_logits(evaluator, tokens):
  # Learned boundaries: (logits, boundary_loss).
  out = compiled_call(evaluator, tokens)
  return np.asarray(out[0] if isinstance(out, tuple) else out)


def _decode(decoder, tokens, chunks):
  """Logits of decoding `tokens` (0 first) in calls of the given lengths."""
  inputs = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  if decoder not in _FAST:
    _FAST[decoder] = tl.Accelerate(decoder)
  fast = _FAST[decoder]
  fast.state = _FRESH.setdefault(decoder, decoder.state)
  outputs, start = [], 0
  for size in chunks:
    outputs.append(np.asarray(fast(inputs[:, start:start + size])))
    start += size
  assert start == tokens.shape[1]
  return np.concatenate(outputs, axis=1)


def _level(model):
  return next(layer for layer in model.sublayers
              if isinstance(layer, th.models.hourglass.DynamicLevel))


def _ends(evaluator, tokens):
  """(batch, len) bool: the segment ends the eval model uses."""
  return th.segment_boundaries(evaluator, tokens)


def _assert_exercises_every_case(ends, n_shortened, first_closes):
  """The test data closes segments where predict mode has separate paths."""
  assert (ends[:, 0] == first_closes).all()
  closed = ends.sum(axis=1)
  assert len(set(closed)) > 1, 'all sequences close the same number'
  assert (ends[:, 1:] & ends[:, :-1]).any(), 'no consecutive closes'
  assert (closed > n_shortened - 1).any(), 'no sequence past the bound'
  assert (closed < n_shortened - 1).any(), 'every sequence past the bound'


@pytest.mark.parametrize('kind', KINDS)
def test_each_kind_decodes_exactly_in_prompts_and_single_tokens(kind):
  evaluator, decoder = _pair(kind)
  tokens = _tokens()
  # The first position closes a segment (null vector and first mean in one
  # step) for all but gumbel's weights.
  _assert_exercises_every_case(_ends(evaluator, tokens),
                               _level(decoder).max_shortened,
                               first_closes=kind != 'gumbel')
  # Learned kinds differ from whitespace only in their boundaries: one
  # compiled call shape for them.
  got = _decode(decoder, tokens, CHUNKS if kind == 'whitespace' else [8, 8])
  np.testing.assert_allclose(got, _eval_logits(evaluator, tokens), atol=1e-4)


def test_shortened_layers_step_once_per_closed_segment_per_sequence():
  """Each sequence's shortened caches hold 1 + min(closed, S-1) positions:
  the null vector and one per segment closed, up to the bound."""
  evaluator, decoder = _pair('whitespace')
  tokens = _tokens()
  _decode(decoder, tokens, CHUNKS)
  level = _level(decoder)
  closed = _ends(evaluator, tokens).sum(axis=1)
  steps = 1 + np.minimum(closed, level.max_shortened - 1)
  middle_state = level.state[level.sublayers.index(level.middle)]
  counters = [np.asarray(x) for x in jax.tree_util.tree_leaves(middle_state)
              if x.dtype == np.int32 and x.shape == (BATCH,)]
  assert counters  # One per attention layer of the shortened level.
  for counter in counters:
    np.testing.assert_array_equal(counter, steps)


def test_past_max_len_raises():
  _, decoder = _pair('whitespace')
  _decode(decoder, _tokens(), CHUNKS)
  with pytest.raises(ValueError, match=rf'token number {LENGTH + 1}, past its '
                     rf'max_len={LENGTH}'):
    decoder(np.zeros((BATCH, 1), np.int32))


@pytest.mark.slow  # ~1-2 min: a model per configuration.
@pytest.mark.parametrize('kind, hierarchy, vanilla, middle_attn, seed', [
    ('whitespace', '2@2', (0, 1), 'rotary', 3),
    ('entropy', '1@4', (1, 0), 'softmax', 4),
    ('gumbel', '1@1 1@2 1@1', (1, 1), 'performer', 5),
    ('whitespace', '1@3', (2, 1), 'sparse_qkv', 6),
])
def test_other_configurations_decode_exactly(kind, hierarchy, vanilla,
                                             middle_attn, seed):
  evaluator, decoder = _pair(kind, hierarchy, vanilla, seed=seed,
                             middle_attn=middle_attn)
  tokens = _tokens()
  assert _ends(evaluator, tokens).any()
  got = _decode(decoder, tokens, [5, 1, 1, LENGTH - 7])
  np.testing.assert_allclose(got, _eval_logits(evaluator, tokens), atol=1e-4)


# Sampling: a whitespace model's trax checkpoint and config.gin, as
# test_sampling.py makes them for a fixed one.
TINY_GIN = """
train.model = @trax_hourglass.HourglassLM
trax_hourglass.HourglassLM.vocab_size = 256
trax_hourglass.HourglassLM.d_model = 16
trax_hourglass.HourglassLM.d_ff = 32
trax_hourglass.HourglassLM.n_heads = 2
trax_hourglass.HourglassLM.vanilla_layers = (1, 1)
trax_hourglass.HourglassLM.hierarchy = '1@3'
trax_hourglass.HourglassLM.dropout = 0.0
trax_hourglass.HourglassLM.boundaries = 'whitespace'
"""
MAX_LEN, BUFFER = 32, 32
PROMPT = np.array([[116, 104, 101, 32], [97, 32, 32, 98]])  # 'the ', 'a  b'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  # Random weights fire too seldom at whitespace to tell: larger ones.
  return configurations.save_run(
      str(tmp_path_factory.mktemp('dynamic_sampling') / 'run'), TINY_GIN,
      seed=0)


@pytest.fixture(scope='module')
def models(run_dir):
  predict, forward = configurations.run_models(run_dir, MAX_LEN)
  # One compiled length: inputs padded to BUFFER (causal, so the prefix holds).
  return predict, lambda x: forward(
      np.pad(x, ((0, 0), (0, BUFFER - x.shape[1]))))


def _greedy_by_eval_model(evaluate, prompt, n_tokens):
  seqs = np.asarray(prompt, np.int32)
  for _ in range(n_tokens):
    logits = evaluate(np.pad(seqs, ((0, 0), (0, 1))))
    seqs = np.concatenate(
        [seqs, logits[:, seqs.shape[1]].argmax(-1)[:, None]], axis=1)
  return seqs[:, -n_tokens:]


def test_sample_greedy_equals_eval_model_argmax(models):
  predict, evaluate = models
  tokens = decoding.sample(predict, 24, prompt=PROMPT, temperature=0)
  np.testing.assert_array_equal(tokens,
                                _greedy_by_eval_model(evaluate, PROMPT, 24))
  sequence = np.concatenate([PROMPT, tokens], axis=1)
  # The sequences differ in where they close segments.
  ends = np.isin(np.pad(sequence, ((0, 0), (1, 0)))[:, :-1],
                 dynamic.WHITESPACE_TOKENS)
  assert ends.any(axis=1).all() and (ends[0] != ends[1]).any()


def test_hourglass_sample_a_dynamic_run(run_dir, models, capsys):
  _, evaluate = models
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    assert sample_cli.main([
        '--output_dir', run_dir, '--prompt', 'a  b', '--n_tokens', '12',
        '--temperature', '0']) == 0
  finally:
    gin.clear_config()
  captured = capsys.readouterr()
  expected = _greedy_by_eval_model(evaluate, PROMPT[[1, 1]], 12)[0]
  text = (b'a  b' + bytes(expected.astype(np.uint8))).decode(
      'utf-8', errors='replace')
  assert captured.out == f'{text}\n'
  assert re.search(r'\[12/12 bytes\] [\d,.]+ tokens/s', captured.err)


# Past the bound S, boundaries forced: the model's vectors at the level carry
# a marker (+/-) of their token, and each kind's boundaries read it, so where
# segments close is set by the tokens (as whitespace), not by a random draw.
MARKED = SPACES  # Tokens whose position ends a segment.
# S = 1 + ceil(0.35 * 32 / 3) = 5 for a model of max_len 32, decoding 16
# tokens: eval mode on 16 tokens must bound the segments by the same S.
FORCED_BOUND, FORCED_MAX_LEN = 0.35, 2 * LENGTH


def _forced_weights(model, seed):
  """Random weights (scale 0.5) in which the level's boundaries follow
  MARKED: the level's input vector at a position holding token x has
  coordinate 0 = +/-3.5 (x marked or not) and coordinate 1 = 1.

  Learned predictors give logits +/-14 from coordinate 0 (gumbel's position
  noise, logistic, exceeds 14 with probability 1e-6); the router's p turns on
  the sign of q.k = -v_0[t] + (small terms), with q_0 = v_1[t-1] = 1.
  """
  model.weights = configurations.redrawn(model.weights, seed)
  layers = model.sublayers
  level = _level(model)
  i = layers.index(level)
  embedding, norm = layers[i - 3], layers[i - 1]  # Embedding, Dropout, norm.
  assert isinstance(embedding, tl.Embedding), layers
  rng = np.random.RandomState(seed)
  table = rng.normal(0, 0.3, embedding.weights.shape).astype(np.float32)
  table[:, 0] = np.where(np.isin(np.arange(VOCAB), MARKED), 3.0, -3.0)
  table[:, 1] = 1.0
  embedding.weights = table
  scale, bias = (np.ones(table.shape[1], np.float32),
                 np.zeros(table.shape[1], np.float32))
  scale[1], bias[1] = 0.0, 1.0  # Coordinate 1: 1 after the norm.
  norm.weights = (scale, bias)
  if level.kind == 'router':
    w_q, w_k = (rng.normal(0, 0.2, (table.shape[1],) * 2).astype(np.float32)
                for _ in range(2))
    for w in (w_q, w_k):
      w[:2], w[:, :2] = 0.0, 0.0
    w_q[1, 0], w_k[0, 0] = 1.0, -1.0
    level.boundaries.weights = (w_q, w_k)
  elif level.kind != 'whitespace':
    first, last = [layer for layer in level.boundaries.sublayers
                   if isinstance(layer, th.layers.dense.Dense)]
    w1, b1 = (np.zeros_like(x) for x in first.weights)
    w1[0, 0] = 8.0
    first.weights = (w1, b1)
    w2, b2 = (np.zeros_like(x) for x in last.weights)
    w2[0, 0], b2[...] = 1.0, -14.0
    last.weights = (w2, b2)
  return model.weights


def _marked_ends(kind, tokens):
  """The segment ends the forced weights give (position t holds token t-1)."""
  marked = np.isin(np.pad(tokens, ((0, 0), (1, 0)))[:, :-1], MARKED)
  if kind == 'router':  # A chunk starts at a marked position: an end before.
    return np.pad(marked[:, 1:], ((0, 0), (0, 1)))
  return marked


@functools.lru_cache(maxsize=None)
def forced_pair(kind, max_len=FORCED_MAX_LEN, bound=FORCED_BOUND, seed=0):
  """(eval model, predict model), both of `max_len`, with `_forced_weights`."""
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2, dropout=0.0,
              hierarchy='1@3', vanilla_layers=(0, 1), boundaries=kind,
              boundary_tokens=MARKED, shortened_bound=bound, max_len=max_len,
              sentencepiece_model=(_sentencepiece_model() if kind == 'unigram'
                                   else None))
  evaluator = th.HourglassLM(mode='eval', **args)
  evaluator.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  weights = _forced_weights(evaluator, seed)
  decoder = th.HourglassLM(mode='predict', **args)
  decoder.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  decoder.weights = weights
  return evaluator, decoder


def log_probs(logits):
  return np.asarray(jax.nn.log_softmax(np.asarray(logits), axis=-1))


def assert_past_the_bound(evaluator, decoder, tokens):
  """The forced ends hold, rows close different numbers of segments, some
  more than S holds and some fewer."""
  kind = _level(evaluator).kind
  ends = _ends(evaluator, tokens)
  np.testing.assert_array_equal(ends, _marked_ends(kind, tokens))
  n_short = _level(decoder).max_shortened
  assert n_short == _level(evaluator).max_shortened
  pooled = ends.sum(axis=1) + (kind == 'router')  # The router's first chunk.
  assert len(set(pooled)) == BATCH, pooled
  assert (pooled > n_short).any() and (pooled < n_short - 1).any(), (
      pooled, n_short)


@pytest.mark.parametrize('kind', KINDS + ('router',))
def test_each_kind_decodes_exactly_past_the_bound_of_its_max_len(kind):
  """Decoding 16 tokens with a model of max_len 32 equals eval mode on the
  16 (and eval mode on a prefix equals eval mode on the whole: the bound is
  the model's, not the input's length)."""
  evaluator, decoder = forced_pair(kind)
  tokens = _tokens()
  assert_past_the_bound(evaluator, decoder, tokens)
  expected = log_probs(_eval_logits(evaluator, tokens))
  got = log_probs(_decode(decoder, tokens, [LENGTH]))  # One prompt: scanned.
  np.testing.assert_allclose(got, expected, atol=1e-4)
  n = 6  # A prefix past the bound of its own length.
  np.testing.assert_allclose(
      log_probs(_eval_logits(evaluator, tokens[:, :n])), expected[:, :n],
      atol=1e-5, err_msg=f'eval mode on the first {n} tokens')
