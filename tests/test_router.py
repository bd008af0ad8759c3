"""H-Net's dynamic chunking (boundaries='router'): its parts, loss, gin lines,
gradients, and decoding in the samplers.

Exact decoding past S (a batch whose rows start chunks at different tokens,
forced by the weights; a prompt) is `test_dynamic_predict`'s
`test_each_kind_decodes_exactly_past_the_bound_of_its_max_len[router]`;
causality is `test_dynamic_pooling`'s property test, which draws the router
too.
"""

import gin
import jax
from jax import numpy as jnp
import numpy as np
import pytest
from trax import shapes
from trax.supervised import decoding as trax_decoding

import trax_hourglass as th
from trax_hourglass import decoding
from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers import router
from test_dynamic_predict import BATCH, LENGTH, MARKED, VOCAB, _level, _tokens, forced_pair  # pylint: disable=g-bad-import-order


def test_router_probability_chunks_ema_and_confidence():
  """p from adjacent vectors (W_q on the previous one), chunks at p > 0.5,
  the chunk's first vector pooled, H-Net's EMA over chunks, confidence 1."""
  vecs = np.array([[[1., 0.], [1., 0.1], [0., 1.], [-1., -0.5], [-1., 0.1]]],
                  np.float32)
  toks = np.zeros((1, 5), np.int32)
  layer = router.RouterBoundaries()
  layer.init(shapes.signature((vecs, toks)))
  w_q = np.array([[1., 0.], [0., 2.]], np.float32)
  layer.weights = (w_q, np.eye(2, dtype=np.float32))
  _, p, aux = layer((vecs, toks))
  unit = lambda x: x / np.linalg.norm(x)  # pylint: disable=unnecessary-lambda-assignment
  expected = [1.0] + [(1 - unit(vecs[0, t - 1] @ w_q) @ unit(vecs[0, t])) / 2
                      for t in range(1, 5)]
  np.testing.assert_allclose(p[0], expected, atol=1e-6)
  np.testing.assert_array_equal(aux, p)
  np.testing.assert_array_equal(np.asarray(p[0]) > 0.5, [1, 0, 0, 1, 0])
  # S = 1 + ceil(1.0 * 5 / 1) = 6 for max_len 5: min(S, len) = 5 rows.
  short = np.asarray(router.ChunkSelection(1, bound=1.0, max_len=5)((vecs, p)))
  assert short.shape == (1, 5, 2)
  np.testing.assert_allclose(short[0, :2], vecs[0, [0, 3]])
  np.testing.assert_allclose(short[0, 2:], 0)
  # Bound to S = 1 + ceil(0.2 * 5 / 1) = 2 chunks: the same two.
  np.testing.assert_allclose(
      router.ChunkSelection(1, bound=0.2, max_len=5)((vecs, p))[0], short[0, :2])
  out = np.array([[[2., 0.], [0., 4.], [9., 9.], [9., 9.], [9., 9.]]],
                 np.float32)
  up = np.asarray(router.ChunkUpsampling()((out, p)))
  p0, p3 = 1 - router.EMA_CLAMP, float(p[0, 3])
  z0 = p0 * out[0, 0]
  z1 = p3 * out[0, 1] + (1 - p3) * z0
  np.testing.assert_allclose(up[0], [z0, z0, z0, z1, z1], rtol=1e-5)
  np.testing.assert_allclose(router.confidence(p), 1.0)
  # Its gradient is that of max(p, 1 - p): +1 where p > 0.5, -1 below.
  grad = jax.grad(lambda p: router.confidence(p).sum())(p)
  np.testing.assert_allclose(grad[0], [1, -1, -1, 1, -1])


def test_ratio_loss_is_hnets_and_least_at_the_target_share():
  p = np.array([[1.0, 0.2, 0.7, 0.1, 0.4, 0.3]], np.float32)
  n, f, g = 3.0, 2 / 6, p.mean()
  expected = 0.03 * n / (n - 1) * ((1 - f) * (1 - g) + f * g * (n - 1))
  np.testing.assert_allclose(dynamic.ratio_loss(p, 3), expected, rtol=1e-6)
  # F = G = 1/N: the loss is its weight, and the least of losses with that F.
  exact = np.array([[0.9, 0.2, 0.2] * 2], np.float32)
  exact = exact - exact.mean() + 1 / 3
  np.testing.assert_allclose(dynamic.ratio_loss(exact, 3), 0.03, rtol=1e-5)
  grad = jax.grad(lambda p: dynamic.ratio_loss(p, 3))(exact)
  np.testing.assert_allclose(grad, 0, atol=1e-7)  # (1-F) = F (N-1): flat.


def test_router_settings_are_gin_lines():
  gin.clear_config()
  try:
    gin.parse_config("""
trax_hourglass.HourglassLM.boundaries = 'router'
trax_hourglass.HourglassLM.hierarchy = '1@1 1@4 1@1'
trax_hourglass.HourglassLM.shortened_bound = 1.5
trax_hourglass.HourglassLM.max_len = 64
trax_hourglass.ratio_loss.weight = 0.5
""")
    model = th.HourglassLM(VOCAB, d_model=16, d_ff=32, n_heads=2, mode='eval')
    model.init(shapes.ShapeDtype((1, 8), np.int32))
    p = np.full((1, 8), 0.25, np.float32)  # F = 0, G = 1/4: N/(N-1) (1-G).
    np.testing.assert_allclose(dynamic.ratio_loss(p, 4), 0.5 * 4 / 3 * 0.75,
                               rtol=1e-6)
  finally:
    gin.clear_config()
  level = _level(model)
  assert isinstance(level, th.models.router_level.RouterLevel)
  assert (level.kind, level.shorten_factor, level.bound,
          level.max_shortened) == ('router', 4, 1.5, 1 + 24)
  assert isinstance(level.boundaries, router.RouterBoundaries)


def test_router_trains_its_projections_through_both_losses():
  """Finite, nonzero gradients for W_q and W_k (at the identity, where the
  first position's previous vector is 0 and a norm's gradient there is
  NaN) from the language-model loss (through the EMA and the confidence)
  and from the ratio loss."""
  model = th.HourglassLM(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
                         vanilla_layers=(1, 1), hierarchy='1@3',
                         boundaries='router', mode='train', max_len=LENGTH)
  tokens = _tokens()
  model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
  weights, state = model.weights, model.state
  i = model.sublayers.index(_level(model))

  def router_grads(weights):
    def losses(weights):
      (logits, ratio), _ = model.pure_fn(tokens, weights, state,
                                         jax.random.PRNGKey(0))
      log_probs = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(log_probs, tokens[..., None], -1).mean(), ratio
    return [jax.grad(lambda w, j=j: losses(w)[j])(weights)[i][0]
            for j in (0, 1)]  # The level's router: (W_q, W_k), per loss.

  for use, grads in zip(('lm', 'ratio'), jax.jit(router_grads)(weights)):
    for g in grads:
      assert g.shape == (16, 16)
      assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, (use, g)


# Forced weights (random otherwise) whose greedy continuations of the prompt
# start chunks (marked tokens) in some rows, at different steps, and not in
# others; most seeds continue with one unmarked token.
GREEDY_SEED = 4


@pytest.fixture(scope='module')
def greedy_router():
  """(forced router pair, prompt, 12 greedy tokens by the eval model): rows
  start chunks at different tokens, in the prompt and in the continuation,
  and row 0 more than S."""
  evaluator, decoder = forced_pair('router', seed=GREEDY_SEED)
  prompt, n_tokens = _tokens()[:, :8], 12
  rng = evaluator.rng  # pure_fn under jit leaves a tracer there.
  forward = jax.jit(lambda x: evaluator.pure_fn(
      x, evaluator.weights, evaluator.state, jax.random.PRNGKey(0))[0][0])
  seqs = prompt
  for _ in range(n_tokens):  # One length: later tokens leave earlier ones be.
    n = seqs.shape[1]
    logits = np.asarray(forward(np.pad(seqs, ((0, 0), (0, 8 + n_tokens - n)))))
    seqs = np.concatenate(
        [seqs, logits[:, n].argmax(-1)[:, None].astype(np.int32)], axis=1)
  evaluator.rng = rng
  starts = th.segment_boundaries(evaluator, seqs).sum(axis=1) + 1
  assert len(set(starts)) == BATCH and starts.max() > _level(
      decoder).max_shortened, starts
  later = np.isin(seqs[:, 8:-1], MARKED)  # Chunk starts while sampling.
  assert later.any() and not later.all(axis=1).any() and len(
      {tuple(row) for row in later}) == BATCH, seqs
  return decoder, prompt, seqs[:, 8:]


def test_router_samples_greedily_as_eval_mode_in_our_sampler(greedy_router):
  decoder, prompt, expected = greedy_router
  got = decoding.sample(decoder, expected.shape[1], prompt=prompt,
                        temperature=0)
  np.testing.assert_array_equal(got, expected)


def test_router_samples_greedily_as_eval_mode_in_trax_loop(greedy_router):
  decoder, prompt, expected = greedy_router
  decoder.state = decoding.fresh_state(decoder, BATCH)
  got = trax_decoding.autoregressive_sample(
      decoder, inputs=prompt, batch_size=BATCH, temperature=0.0,
      max_length=expected.shape[1], eos_id=-1)
  np.testing.assert_array_equal(got, expected)
