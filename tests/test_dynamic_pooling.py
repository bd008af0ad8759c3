"""Dynamic pooling: boundaries, segment means, the bound, causality, losses."""

import atexit
import functools
import math
import os
import re
import shutil
import tempfile

import gin
import hypothesis
from hypothesis import strategies as st
import jax
from jax import numpy as jnp
import numpy as np
import pytest
import trax.layers as tl
from trax import shapes

import trax_hourglass as th
from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass import scoring
from trax_hourglass.layers import segmentation

from configurations import compiled_call  # pylint: disable=g-bad-import-order

VOCAB, LENGTH, D_MODEL = 16, 24, 16
SPACES = (3, 7)  # The test vocabulary's boundary tokens.
KINDS = ('whitespace', 'entropy', 'gumbel', 'unigram', 'router')


@functools.lru_cache(maxsize=None)
def _sentencepiece_model():
  """A tiny SentencePiece unigram model of made-up words (its path)."""
  spm = pytest.importorskip('sentencepiece')
  folder = tempfile.mkdtemp()
  atexit.register(shutil.rmtree, folder, True)
  words = 'the walking talked hourglass shortened runner walks sequence'.split()
  text = ' '.join(np.random.RandomState(0).choice(words, 600))
  path = os.path.join(folder, 'unigram.model')
  with open(path, 'wb') as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text[i:i + 100]
                               for i in range(0, len(text), 100)),
        model_writer=f, vocab_size=40, model_type='unigram', num_threads=1,
        minloglevel=2)
  return path


@functools.lru_cache(maxsize=None)
def _model(kind, k=3, vanilla=(1, 1), bound=dynamic.SHORTENED_BOUND,
           mode='eval'):
  model = th.HourglassLM(
      VOCAB, d_model=D_MODEL, d_ff=32, n_heads=2, vanilla_layers=vanilla,
      hierarchy=f'1@{k}', mode=mode, boundaries=kind, boundary_tokens=SPACES,
      shortened_bound=bound, max_len=LENGTH, sentencepiece_model=(
          _sentencepiece_model() if kind == 'unigram' else None))
  # A fixed key: the same weights whichever test builds the model first.
  model.init(shapes.ShapeDtype((3, LENGTH), np.int32),
             rng=jax.random.PRNGKey(0))
  return model


def _logits(model, tokens):
  out = compiled_call(model, np.asarray(tokens, np.int32))
  return np.asarray(out[0] if isinstance(out, tuple) else out)


def _tokens(rng, n=LENGTH):
  """Random tokens, about a third of them boundary tokens."""
  tokens = rng.randint(VOCAB, size=n)
  spaces = rng.rand(n) < 0.3
  tokens[spaces] = rng.choice(SPACES, size=spaces.sum())
  return tokens.astype(np.int32)


def _changed_at(tokens, t, rng):
  """Rows: tokens; token t toggled between a boundary and not; t.. redrawn."""
  batch = np.stack([tokens] * 3)
  if tokens[t] in SPACES:
    batch[1, t] = next(x for x in range(VOCAB) if x not in SPACES)
  else:
    batch[1, t] = SPACES[0]
  batch[2, t:] = _tokens(rng, LENGTH - t)
  return batch


def _leak(model, tokens, t, rng):
  """Largest change of an output at positions <= t when token t changes."""
  out = _logits(model, _changed_at(tokens, t, rng))
  return max(np.abs(out[row, :t + 1] - out[0, :t + 1]).max() for row in (1, 2))


def _assert_causal(model, tokens, t, rng):
  out = _logits(model, _changed_at(tokens, t, rng))
  for row in (1, 2):
    np.testing.assert_allclose(out[row, :t + 1], out[0, :t + 1], atol=1e-5,
                               err_msg=f'output <= {t} changed with token {t}')
  if t + 1 < LENGTH:  # The test can fail: a later output does change.
    assert np.abs(out[1, t + 1:] - out[0, t + 1:]).max() > 1e-4


def _causality_property(max_examples):
  @hypothesis.settings(max_examples=max_examples, deadline=None,
                       derandomize=True)
  @hypothesis.given(
      kind=st.sampled_from(KINDS),
      k=st.sampled_from([2, 3, 4]),
      vanilla=st.tuples(st.integers(0, 1), st.integers(0, 1)),
      bound=st.sampled_from([0.5, dynamic.SHORTENED_BOUND]),
      t=st.integers(0, LENGTH - 1),
      seed=st.integers(0, 2**16),
  )
  def test(kind, k, vanilla, bound, t, seed):
    """Through the boundaries, the segment means and the bound (0.5: most
    sequences have more segments than the shortened length holds)."""
    rng = np.random.RandomState(seed)
    _assert_causal(_model(kind, k, vanilla, bound), _tokens(rng), t, rng)
  return test


test_changing_token_t_leaves_outputs_up_to_t_unchanged = _causality_property(6)
test_causality_more_examples = pytest.mark.slow(_causality_property(40))


def test_every_kind_is_causal_at_boundary_tokens():
  """Each kind at once, whatever hypothesis drew; t on and off a boundary."""
  rng = np.random.RandomState(0)
  tokens = _tokens(rng)
  for kind in KINDS:
    for t in (0, 5, 11, 23):
      _assert_causal(_model(kind), tokens, t, rng)


def test_upsampling_from_the_open_segment_fails_the_causality_test(
    monkeypatch):
  """The broken variant (position t reads its own, incomplete, segment)
  leaks the future: the same check catches it."""
  rng = np.random.RandomState(0)
  tokens = _tokens(rng)
  model = _model('whitespace')
  assert max(_leak(model, tokens, t, rng) for t in range(LENGTH)) < 1e-5
  monkeypatch.setattr(dynamic, 'upsampled_segment',
                      lambda closed, n: jnp.minimum(closed + 1, n - 1))
  model = _model.__wrapped__('whitespace')  # Same weights, with the variant.
  leaks = [_leak(model, tokens, t, rng) for t in range(LENGTH)]
  assert max(leaks) > 1e-3, leaks
  with pytest.raises(AssertionError, match='changed with token'):
    for t in range(LENGTH):
      _assert_causal(model, tokens, t, rng)


def test_segments_past_the_bound_keep_the_last_shortened_vector():
  """Every token a boundary, bound 0.5 at k=3: S = 5 holds 4 segments of 24.
  No error; until the 4th closes the outputs are those of a model with room
  for all (same weights), afterwards they differ (stale, not future)."""
  tokens = np.full((3, LENGTH), SPACES[0], np.int32)
  tokens[1] = _tokens(np.random.RandomState(1))
  tokens[1, :6] = SPACES[1]
  small, large = _model('whitespace', bound=0.5), _model('whitespace', bound=4.0)
  assert dynamic.shortened_length(LENGTH, 3, 0.5) == 5
  large.weights = small.weights
  a, b = _logits(small, tokens), _logits(large, tokens)
  assert np.isfinite(a).all()
  # Position t holds token t-1: 4 segments closed after position 4.
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
  assert np.abs(a[0, 5:] - b[0, 5:]).max() > 1e-4
  rng = np.random.RandomState(2)
  for t in (2, 4, 5, 12):
    _assert_causal(small, tokens[0], t, rng)


def test_segment_means_and_null_vector():
  vecs = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
  ends = np.array([[0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1]], np.float32)
  means = np.asarray(dynamic.segment_means(vecs, ends, 3))[..., 0]
  np.testing.assert_allclose(means[0], [0.5, 3.0, 5.0])  # The last: open.
  np.testing.assert_allclose(means[1], [6.0, 7.0, 8.0])  # Past 3: dropped.
  closed = np.cumsum(ends, axis=1).astype(np.int32)
  np.testing.assert_array_equal(dynamic.upsampled_segment(closed, 4),
                                [[0, 1, 1, 1, 2, 2], [1, 2, 3, 3, 3, 3]])


def _outputs_and_grads(model, tokens, *loss_fns):
  """Model outputs, and the gradient of each loss_fn(outputs) with respect to
  the model's weights: one compiled function."""
  def run(weights):
    def outputs(weights):
      return model.pure_fn(tokens, weights, model.state, model.rng)[0]
    return outputs(weights), [jax.grad(lambda w, f=f: f(*outputs(w)))(weights)
                              for f in loss_fns]
  return jax.jit(run)(model.weights)


def _predictor(model, tree):
  """The part of a weights-shaped tree that is the boundary predictor's."""
  i = next(i for i, layer in enumerate(model.sublayers)
           if isinstance(layer, th.models.hourglass.DynamicLevel))
  return tree[i][0]


@pytest.mark.parametrize(
    'kind', ['gumbel', pytest.param('entropy', marks=pytest.mark.slow)])
def test_learned_boundaries_train_with_their_loss(kind):
  """Train mode returns (logits, boundary_loss); LossWithBoundaries adds the
  term; the predictor gets gradient: entropy from its own loss only (hard
  boundaries), gumbel also from the LM loss (straight-through, through the
  segment means)."""
  model = _model(kind, mode='train')
  rng = np.random.RandomState(3)
  tokens = np.stack([_tokens(rng) for _ in range(3)])
  targets, weights = tokens, np.ones(tokens.shape, np.float32)
  cross_entropy = tl.WeightedCategoryCrossEntropy()
  total = th.layers.LossWithBoundaries()
  def lm_loss(logits, unused_boundary_loss):
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

  (logits, boundary_loss), (with_term, lm_only) = _outputs_and_grads(
      model, tokens, lambda l, b: lm_loss(l, b) + b, lm_loss)
  assert logits.shape == (3, LENGTH, VOCAB) and boundary_loss.shape == ()
  assert float(boundary_loss) > 0
  np.testing.assert_allclose(
      total((logits, boundary_loss, targets, weights)),
      lm_loss(logits, None) + boundary_loss, rtol=1e-5)
  np.testing.assert_allclose(cross_entropy((logits, targets, weights)),
                             lm_loss(logits, None), rtol=1e-5)
  metrics = th.layers.boundary_metrics()
  assert float(metrics['boundary_loss'](
      (logits, boundary_loss, targets, weights))) == float(boundary_loss)

  def norm(tree):
    return sum(float(np.abs(x).sum()) for x in jax.tree_util.tree_leaves(tree))

  assert norm(_predictor(model, with_term)) > 0
  if kind == 'gumbel':
    assert norm(_predictor(model, lm_only)) > 0
  else:
    assert norm(_predictor(model, lm_only)) == 0


def test_entropy_targets_are_spikes_and_gumbel_prior_is_binomial():
  # Entropies 1, 3, 2, 2.5, 4 (two-way logits): a spike exceeds the two before.
  p = np.array([0.5, 0.99, 0.9, 0.95, 0.999, 0.6])
  entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
  logits = np.log(np.stack([p, 1 - p], -1))[None].astype(np.float32)
  spikes = np.asarray(dynamic._entropy_spikes(logits))[0]  # pylint: disable=protected-access
  expected = [entropy[t] > entropy[max(t - 1, 0):t].max(initial=-1) and
              entropy[t] > entropy[max(t - 2, 0):t].max(initial=-1)
              for t in range(len(p))]
  np.testing.assert_array_equal(spikes, expected)
  assert spikes.tolist() == [1, 0, 0, 0, 0, 1]
  ends = np.array([[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]], np.float32)
  n, k = 10, 2  # -log Binomial(2; 10, 1/5) / 10
  expected = -(math.log(math.comb(n, k)) + k * math.log(0.2) +
               (n - k) * math.log(0.8)) / n
  np.testing.assert_allclose(dynamic._binomial_prior(ends, 0.2), expected,  # pylint: disable=protected-access
                             rtol=1e-5)


def test_gumbel_samples_boundaries_outside_training_as_in_training():
  """Eval and predict draw gumbel's boundaries with noise fixed by position:
  at the predictor's rate (a threshold alone fires nowhere while p < 0.5, as
  after training against the prior), the same rows for the same logits, and
  predict one position at a time equals eval."""
  p, length = 0.25, 4000
  logits = np.full((2, length), math.log(p / (1 - p)), np.float32)

  def ends(mode, x):
    layer = dynamic.HardBoundaries('gumbel', mode=mode)
    layer.init(shapes.signature(x[:, :1] if mode == 'predict' else x),
               rng=jax.random.PRNGKey(1))
    if mode != 'predict':
      return np.asarray(layer(x)[0])
    return np.concatenate([np.asarray(layer(x[:, t:t + 1])[0])
                           for t in range(x.shape[1])], axis=1)

  evaluated = ends('eval', logits)
  for mode in ('eval', 'train'):
    assert abs(ends(mode, logits).mean() - p) < 0.03, mode
  np.testing.assert_array_equal(evaluated[0], evaluated[1])
  np.testing.assert_array_equal(ends('eval', logits), evaluated)
  np.testing.assert_array_equal(ends('predict', logits[:, :40]),
                                evaluated[:, :40])


TRAINER_GIN = """
import trax_hourglass
train.model = @trax_hourglass.HourglassLM
train.inputs = @trax_hourglass.byte_file_inputs
train.optimizer = @trax.optimizers.Adam
train.steps = 2
train.eval_frequency = 2
train.eval_steps = 1
train.random_seed = 0
train.save_graphs = False
byte_file_inputs.batch_size = 2
byte_file_inputs.sequence_length = 16
multifactor.constant = 0.01
multifactor.factors = 'constant'
trax_hourglass.HourglassLM.vocab_size = 256
trax_hourglass.HourglassLM.d_model = 16
trax_hourglass.HourglassLM.d_ff = 32
trax_hourglass.HourglassLM.n_heads = 2
trax_hourglass.HourglassLM.hierarchy = '1@1 1@3 1@1'
trax_hourglass.HourglassLM.dropout = 0.0
trax_hourglass.HourglassLM.boundaries = 'entropy'
ProgressReporter.every_secs = 0
ProgressReporter.unit = 'byte'
"""


def test_trainer_trains_learned_boundaries_with_their_loss(tmp_path, capsys):
  """One gin line (boundaries) is enough: the trainer binds the loss and
  metrics, trains on cross-entropy + boundary loss, and reports the boundary
  loss beside the eval bits (which are cross-entropy alone)."""
  from trax.data import inputs as trax_inputs  # pylint: disable=g-import-not-at-top
  from trax_hourglass.cli import trainer  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / 'corpus.txt'
  corpus.write_bytes(b'the quick brown fox jumps over the lazy dog. ' * 50)
  config = tmp_path / 'dynamic.gin'
  config.write_text(TRAINER_GIN)
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    assert trainer.main([
        '--config_file', str(config), '--output_dir', str(tmp_path / 'run'),
        f"--config=byte_file_inputs.path='{corpus}'"]) == 0
  finally:
    gin.clear_config()
  printed = capsys.readouterr().out
  assert re.search(r'step 2/2 \| loss [\d.]+ .*\| eval [\d.]+ bits/byte @\d '
                   r'\| boundary loss [\d.]+', printed), printed
  saved = (tmp_path / 'run' / 'config.gin').read_text()
  assert 'train.loss_fn = @trax_hourglass.LossWithBoundaries()' in saved


def test_segment_boundaries_reads_the_ends_the_model_uses():
  rng = np.random.RandomState(4)
  tokens = np.stack([_tokens(rng) for _ in range(3)])
  ends = th.segment_boundaries(_model('whitespace'), tokens)
  shifted = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]  # Position t: token t-1.
  np.testing.assert_array_equal(ends, np.isin(shifted, SPACES))
  model = _model('entropy')
  found = th.segment_boundaries(model, tokens)
  # Not how many: random weights decide that (0.15 to 1.0 of positions seen
  # while Python's `random`, which seeds trax's layers, started from the OS),
  # so a count would be a coin toss. The bias decides below.
  assert found.shape == tokens.shape and found.dtype == bool
  level = next(i for i, layer in enumerate(model.sublayers)
               if isinstance(layer, th.models.hourglass.DynamicLevel))
  weights = model.weights
  last_bias = weights[level][0][3][1]  # Dense(d_ff), activation, Dense(1)
  try:  # The predictor's last bias decides alone.
    for bias, expected in ((1e6, True), (-1e6, False)):
      model.weights = jax.tree_util.tree_map(
          lambda x, b=bias: np.full_like(x, b) if x is last_bias else x,
          weights)
      assert (th.segment_boundaries(model, tokens) == expected).all()
  finally:
    model.weights = weights
  with pytest.raises(ValueError, match='pools every k tokens'):
    th.segment_boundaries(th.HourglassLM(VOCAB, hierarchy='1@2', mode='eval'),
                          tokens)
  with pytest.raises(ValueError, match='needs an eval-mode model'):
    th.segment_boundaries(_model('whitespace', mode='train'), tokens)


def test_unigram_targets_are_the_pieces_at_the_input_positions():
  """The predictor of 'unigram' learns SentencePiece's pieces of the text:
  position t (token t-1) is a target end where a piece ends at token t-1."""
  path = _sentencepiece_model()
  text = b'the walking runner talked'
  toks = np.frombuffer(text, np.uint8).astype(np.int32)[None]
  targets = np.asarray(dynamic._unigram_targets(toks, path))  # pylint: disable=protected-access
  shifted = np.pad(toks, ((0, 0), (1, 0)))[:, :-1]
  np.testing.assert_array_equal(
      targets, segmentation.unigram_boundaries(shifted, path))
  assert targets[0, 4] and targets[0, 12]  # After 'the', 'walking'.
  assert 0 < targets.sum() < len(text)
  with pytest.raises(ValueError, match='needs sentencepiece_model'):
    th.HourglassLM(256, hierarchy='1@3', boundaries='unigram')
  with pytest.raises(ValueError, match='no such file'):
    th.HourglassLM(256, hierarchy='1@3', boundaries='unigram',
                   sentencepiece_model='/no/such.model')


@pytest.mark.parametrize('kwargs, message', [
    (dict(boundaries='spaces'), "boundaries='spaces'; use one of 'fixed', "),
    (dict(boundaries='entropy', hierarchy='1@2 1@4 1@2'),
     'needs exactly one shortened level, got 2'),
    (dict(boundaries='whitespace', hierarchy='4@1'),
     'needs exactly one shortened level, got 0'),
    (dict(boundaries='gumbel', shorten_factor_dropout=(2, 3)),
     'takes no shorten_factor_dropout'),
    (dict(boundaries='whitespace', shortened_bound=0), 'must be a positive'),
    (dict(boundaries='whitespace', boundary_tokens=(' ',)),
     "boundary_tokens=(' ',) must be token ids in [0, vocab_size=16)"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    th.HourglassLM(VOCAB, **{'hierarchy': '1@3', **kwargs})
  assert message in str(error.value).splitlines()[0]  # gin adds a line.


def test_scoring_and_attention_maps_read_dynamic_models():
  """hourglass-eval's Scorer takes the logits of (logits, boundary_loss);
  attention maps name the shortened layers of a dynamic level."""
  rng = np.random.RandomState(5)
  tokens = np.stack([_tokens(rng) for _ in range(3)])
  model = _model('entropy')
  logp = jax.nn.log_softmax(model(tokens)[0])
  expected = np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(scoring.Scorer(model).log2_probs(tokens),
                             expected / math.log(2), atol=1e-4)
  maps = th.attention_maps(_model('whitespace'), tokens)
  assert [(m.name, m.kind, m.shorten_factor) for m in maps] == [
      ('pre/0', 'full', 1), ('level1/shortened/0', 'shortened', 3),
      ('post/0', 'full', 1)]
  n_short = dynamic.shortened_length(LENGTH, 3)
  assert maps[1].weights.shape == (3, 2, n_short, n_short)
