"""Our HourglassLM against trax's original: same weights in, same log-probs out.

The original (`trax.models.research.hourglass`) is the reference and is imported
only here, in tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trax
import trax.layers as tl
from trax import shapes
from trax.layers.research import resampling as orig_resampling
from trax.models.research import hourglass as orig_hourglass

import trax_hourglass as th

VOCAB = 32
SMALL = dict(d_model=32, d_ff=64, n_heads=4)

# name -> (hierarchy, vanilla_layers, resampling names, sequence length)
CONFIGS = {
    # Attention pooling over average pooling, attention upsampling over repeat.
    'enwik8_like': ('2@3', (1, 1), dict(
        downsampling_fn='AttentionResampling',
        upsampling_fn='AttentionResampling',
        attention_downsampling_fn='AveragePooling',
        attention_upsampling_fn='NaiveUpsampling'), 24),
    # Attention pooling over linear pooling.
    'imagenet32_like': ('2@3', (1, 1), dict(
        downsampling_fn='AttentionResampling',
        upsampling_fn='AttentionResampling',
        attention_downsampling_fn='LinearPooling',
        attention_upsampling_fn='LinearUpsampling'), 24),
    # Plain linear pooling and upsampling.
    'imagenet64_like': ('2@3', (1, 1), dict(
        downsampling_fn='LinearPooling',
        upsampling_fn='LinearUpsampling'), 24),
    'three_levels': ('1@2 1@4 1@8 1@4 1@2', (1, 1), {}, 32),
    'shorten_factor_4': ('1@4', (2, 1), dict(
        attention_upsampling_fn='NaiveUpsampling'), 32),
}


def _resampling_kwargs(names, module):
  return {arg: getattr(module, name) for arg, name in names.items()}


def _original(hierarchy, vanilla, names, mode='eval'):
  return orig_hourglass.HourglassLM(
      VOCAB, vanilla_layers=vanilla, hierarchy=hierarchy, mode=mode, **SMALL,
      **_resampling_kwargs(names, orig_resampling))


def _ours(hierarchy, vanilla, names, mode='eval'):
  return th.HourglassLM(
      VOCAB, vanilla_layers=vanilla, hierarchy=hierarchy, mode=mode, **SMALL,
      **_resampling_kwargs(names, th.layers))


def _randomize(model, seed):
  """Re-draws every weight at scale ~0.5 so that position terms matter too.

  trax initialises the shared relative-attention biases at 1e-6, which would
  hide a wrong position layout; random biases expose it.
  """
  rng = np.random.RandomState(seed)
  flat = [w for w in trax.fastmath.tree_flatten(model.weights)]
  new = [np.asarray(rng.normal(0, 0.5, w.shape), w.dtype) for w in flat]
  model.weights, _ = trax.fastmath.tree_unflatten(
      new, model.weights,
      copy_from_tree=[tl.base.EMPTY_WEIGHTS, tl.base.GET_WEIGHTS_FROM_CACHE])


def _logprobs(model, x):
  """Log-probs of a model in one compiled call (faster than op by op)."""
  fn = jax.jit(lambda w, s, x: model.pure_fn(x, w, s, jax.random.PRNGKey(0))[0])
  return jax.nn.log_softmax(fn(model.weights, model.state, x))


def _tokens(length, batch=2, seed=0):
  return np.random.RandomState(seed).randint(
      0, VOCAB, size=(batch, length)).astype(np.int32)


def _original_and_ours(name, seed):
  """(original, ours with the original's random weights, tokens) for CONFIGS[name]."""
  hierarchy, vanilla, names, length = CONFIGS[name]
  x = _tokens(length)
  original = _original(hierarchy, vanilla, names)
  original.init(shapes.signature(x))
  _randomize(original, seed=seed)
  ours = th.load_trax_hourglass_weights(_ours(hierarchy, vanilla, names),
                                        original.weights)
  return original, ours, x


# imagenet64_like's log-probs are also compared in
# test_loads_a_checkpoint_written_by_trax_training_loop: -m slow here.
@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.slow) if name == 'imagenet64_like'
    else name for name in sorted(CONFIGS)])
def test_same_log_probs_as_original(name):
  original, ours, x = _original_and_ours(name, seed=1)
  expected = _logprobs(original, x)
  got = _logprobs(ours, x)
  assert got.shape == (2, CONFIGS[name][3], VOCAB)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_paper_notation_builds_the_same_model():
  x = _tokens(12)
  a = th.HourglassLM(VOCAB, vanilla_layers=(2, 2), hierarchy='2@3', mode='eval',
                     **SMALL)
  a.init(shapes.signature(x))
  _randomize(a, seed=2)
  b = th.load_trax_hourglass_weights(
      th.HourglassLM(VOCAB, hierarchy='2@1 2@3 2@1', mode='eval', **SMALL),
      a.weights)
  np.testing.assert_array_equal(_logprobs(a, x), _logprobs(b, x))


def test_loads_a_checkpoint_written_by_trax_training_loop(tmp_path):
  hierarchy, vanilla, names, length = CONFIGS['imagenet64_like']
  batch = (_tokens(length), _tokens(length), np.ones((2, length), np.float32))
  task = trax.supervised.training.TrainTask(
      labeled_data=iter(lambda: batch, None), loss_layer=tl.WeightedCategoryCrossEntropy(),
      optimizer=trax.optimizers.Adam(1e-3), n_steps_per_checkpoint=1)
  loop = trax.supervised.training.Loop(
      _original(hierarchy, vanilla, names, mode='train'), [task],
      output_dir=str(tmp_path), random_seed=0)
  loop.run(1)  # Writes model.pkl.gz + model.weights.npy.gz at step 1.
  original = _original(hierarchy, vanilla, names)
  original.init_from_file(str(tmp_path / 'model.pkl.gz'), weights_only=True,
                          input_signature=shapes.signature(batch[0]))
  ours = th.load_trax_hourglass_weights(_ours(hierarchy, vanilla, names),
                                        tmp_path / 'model.pkl.gz')
  np.testing.assert_allclose(_logprobs(ours, batch[0]),
                             _logprobs(original, batch[0]), atol=1e-4)


def test_loader_names_a_mismatched_configuration():
  x = _tokens(24)
  original = _original('2@3', (1, 1), {})
  original.init(shapes.signature(x))
  with pytest.raises(ValueError, match='weight arrays'):
    th.load_trax_hourglass_weights(_ours('3@3', (1, 1), {}), original.weights)
  wider = th.HourglassLM(VOCAB, hierarchy='2@3', d_model=64, d_ff=64, n_heads=4,
                         mode='eval')
  with pytest.raises(ValueError, match=r'shape \(32, 32\).*expects \(32, 64\)'):
    th.load_trax_hourglass_weights(wider, original.weights)


def _weight_gradients(model, x):
  """Gradients of the mean next-token log-prob with respect to every weight."""
  def objective(weights):
    logits = model.pure_fn(x, weights, model.state, jax.random.PRNGKey(0))[0]
    log_probs = jax.nn.log_softmax(logits)
    return jnp.mean(jnp.take_along_axis(log_probs, x[..., None], axis=-1))
  return trax.fastmath.tree_flatten(jax.jit(jax.grad(objective))(model.weights))


@pytest.mark.parametrize('name', [  # Linear pooling's: -m slow.
    'enwik8_like', pytest.param('imagenet64_like', marks=pytest.mark.slow)])
def test_same_weight_gradients_as_original(name):
  # Our Dense layers differentiate by hand (layers/dense.py); training must
  # still follow the original's gradients.
  original, ours, x = _original_and_ours(name, seed=3)
  expected = _weight_gradients(original, x)
  got = _weight_gradients(ours, x)
  assert [g.shape for g in got] == [g.shape for g in expected]
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize('shape,use_bias', [((2, 3, 5), True), ((4, 5), False)])
def test_dense_matches_tl_dense_in_value_and_gradient(shape, use_bias):
  x = np.random.RandomState(0).normal(size=shape).astype(np.float32)
  reference = tl.Dense(7, use_bias=use_bias)
  reference.init(shapes.signature(x))
  ours = th.layers.Dense(7, use_bias=use_bias)
  ours.init(shapes.signature(x))
  ours.weights = reference.weights

  def loss(layer):
    def fn(weights, x):
      y = layer.pure_fn(x, weights, (), None)[0]
      return jnp.sum(jnp.sin(y))  # A gradient that differs per output.
    return jax.grad(fn, argnums=(0, 1))

  np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6)
  got = jax.tree_util.tree_leaves(loss(ours)(ours.weights, x))
  expected = jax.tree_util.tree_leaves(loss(reference)(reference.weights, x))
  for g, e in zip(got, expected, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_dense_built_in_jax_backward_differentiates_as_tl_dense():
  # The train_speed ablation `ours_tl_dense`: the same layer and weights, with
  # jax deriving the backward pass (no custom rule in the computation).
  from trax_hourglass.layers import dense  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).normal(size=(2, 3, 5)).astype(np.float32)
  ours = th.layers.Dense(7)
  with dense.jax_backward():
    plain = th.layers.Dense(7)
  after = th.layers.Dense(7)  # The context ended: ours again.
  for layer in (ours, plain, after):
    layer.init(shapes.signature(x))
    layer.weights = ours.weights
  custom = lambda layer: 'custom_vjp' in str(jax.make_jaxpr(
      lambda w: layer.pure_fn(x, w, (), None)[0])(layer.weights))
  assert [custom(l) for l in (ours, plain, after)] == [True, False, True]
  assert isinstance(plain, th.layers.Dense)
  np.testing.assert_array_equal(plain(x), ours(x))
