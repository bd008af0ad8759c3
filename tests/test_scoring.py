"""Tests of trax_hourglass.scoring against direct computations."""

import math

import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from trax_hourglass import scoring

VOCAB = 7


def _direct_log_probs(logits, targets):
  """log softmax(logits)[targets] in float64, written out."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def test_token_log_probs_is_the_log_softmax_at_the_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, VOCAB)).astype(np.float32) * 3
  targets = rng.integers(0, VOCAB, (2, 5))
  got = np.asarray(scoring.token_log_probs(logits, targets))
  np.testing.assert_allclose(got, _direct_log_probs(logits, targets),
                             atol=1e-5)
  # Stable: shifting every logit by 1000 changes nothing (exp would overflow).
  shifted = np.asarray(scoring.token_log_probs(logits + 1000., targets))
  assert np.all(np.isfinite(shifted))
  np.testing.assert_allclose(shifted, got, atol=1e-3)


def _lm(length=6, batch=2):
  """A tiny causal LM: ShiftRight, Embedding, Dense to the vocabulary."""
  model = tl.Serial(tl.ShiftRight(mode='eval'), tl.Embedding(VOCAB, 4),
                    tl.Dense(VOCAB))
  model.init(shapes.ShapeDtype((batch, length), np.int32))
  return model


def test_scorer_gives_log2_probs_of_each_token_under_the_model():
  model = _lm()
  x = np.array([[1, 2, 3, 4, 5, 6], [6, 0, 0, 1, 3, 2]], np.int32)
  scorer = scoring.Scorer(model)
  logits = np.asarray(model(x))
  np.testing.assert_allclose(scorer.log2_probs(x),
                             _direct_log_probs(logits, x) / math.log(2),
                             atol=1e-5)
  # Other targets at the same inputs, and other weights.
  y = (x + 1) % VOCAB
  np.testing.assert_allclose(scorer.log2_probs(x, targets=y),
                             _direct_log_probs(logits, y) / math.log(2),
                             atol=1e-5)
  other = _lm()
  other.weights = (other.weights[0], other.weights[1],
                   tuple(2. * w for w in other.weights[2]))
  np.testing.assert_allclose(
      scorer.log2_probs(x, weights=other.weights),
      _direct_log_probs(np.asarray(other(x)), x) / math.log(2), atol=1e-5)


def _uniform_lm(length, batch):
  """An LM whose every prediction is uniform: log2 p = -log2(VOCAB)."""
  model = _lm(length, batch)
  embedding, dense = model.weights[1], model.weights[2]
  model.weights = (model.weights[0], embedding,
                   tuple(np.zeros_like(w) for w in dense))
  return model


def test_bits_per_byte_and_per_dim_of_a_uniform_model():
  calls = []
  progress = lambda *args: calls.append(args)
  scorer = scoring.Scorer(_uniform_lm(length=8, batch=3))
  data = np.arange(50, dtype=np.uint8) % VOCAB
  bits, n = scoring.score_bytes(scorer, data, 8, 3, 3, progress=progress)
  assert n == 50
  assert bits / n == pytest.approx(math.log2(VOCAB), rel=1e-6)
  # 15 windows (the first, then 3 new bytes each) in batches of 3.
  assert [c[:2] for c in calls] == [(i, 5) for i in range(1, 6)]
  assert calls[-1][3] == 50 and calls[-1][2] == pytest.approx(bits)

  images = np.arange(7 * 8).reshape(7, 8) % VOCAB
  bits, n = scoring.score_images(scorer, images, 3)
  assert n == images.size
  assert bits / n == pytest.approx(math.log2(VOCAB), rel=1e-6)


def test_score_images_scores_each_image_on_its_own():
  model = _lm(length=5, batch=2)
  scorer = scoring.Scorer(model)
  images = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [0, 6, 0, 6, 0]])
  alone = [np.asarray(model(images[[i, i]]))[0] for i in range(3)]
  direct = -sum(_direct_log_probs(logits, image).sum()
                for logits, image in zip(alone, images))
  bits, _ = scoring.score_images(scorer, images, 2)  # Last batch padded.
  assert bits == pytest.approx(direct / math.log(2), rel=1e-5)
