"""HourglassLM's remat and dtype options.

remat='blocks' recomputes the decoder blocks in the backward pass: same loss,
same gradients. dtype='bfloat16' computes the matrix products in bfloat16 on
float32 weights: checkpoints load into either precision, predict mode agrees
with eval mode, and training ends near the float32 loss.
"""

import collections
import functools
import itertools
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trax
import trax.layers as tl
from trax import shapes
from trax.models.research import hourglass as orig_hourglass

import trax_hourglass as th
from trax_hourglass import checkpoints
from trax_hourglass import decoding
from trax_hourglass import runs
from trax_hourglass import training
from trax_hourglass.checkpoints.format import from_bits
from trax_hourglass.cli import trainer
from trax_hourglass.layers import precision
from trax.data import inputs as trax_inputs
import configurations  # pylint: disable=g-bad-import-order

try:
  from jax.extend.core import jaxprs_in_params as _jaxprs_in_params  # pylint: disable=g-import-not-at-top
except ImportError:  # jax 0.4.x
  _jaxprs_in_params = jax.core.jaxprs_in_params


VOCAB, BATCH, LENGTH = 32, 2, 12
TINY = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
            vanilla_layers=(1, 1), hierarchy='1@3')
QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'gin', 'quickstart.gin')


def _tokens(seed=0, length=LENGTH):
  return np.random.RandomState(seed).randint(
      1, VOCAB, size=(BATCH, length)).astype(np.int32)


def _model(mode='eval', **kwargs):
  model = th.HourglassLM(mode=mode, **dict(TINY, **kwargs))
  model.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  return model


def _loss_fn(model):
  """weights, tokens -> mean next-token cross-entropy, the model's own rng."""
  def loss(weights, x):
    logits = model.pure_fn(x, weights, model.state, jax.random.PRNGKey(1))[0]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, x[..., None], axis=-1))
  return loss


def _log_probs(model, x):
  fwd = jax.jit(lambda w, s, x: model.pure_fn(x, w, s, jax.random.PRNGKey(0))[0])
  return np.asarray(jax.nn.log_softmax(fwd(model.weights, model.state, x)))


def _primitives(jaxpr):
  """Counter of the primitives' names in jaxpr, nested jaxprs too."""
  found = collections.Counter(eqn.primitive.name for eqn in jaxpr.eqns)
  for eqn in jaxpr.eqns:
    for sub in _jaxprs_in_params(eqn.params):
      found += _primitives(sub)
  return found


def _operand_dtypes(jaxpr, primitives):
  """Counter of the operand dtypes of each of `primitives` in jaxpr, nested
  jaxprs too."""
  found = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      found[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
    for sub in _jaxprs_in_params(eqn.params):
      found += _operand_dtypes(sub, primitives)
  return found


def test_remat_gives_the_same_loss_and_gradients():
  # Train mode with dropout: recomputing must draw the same masks again.
  plain = _model('train', dropout=0.1)
  plain.weights = configurations.redrawn(plain.weights, 0)
  remat = _model('train', dropout=0.1, remat='blocks')
  remat.weights = plain.weights  # The same weights tree.
  x = _tokens()
  jaxpr = jax.make_jaxpr(_loss_fn(remat))(remat.weights, x).jaxpr
  # jax.checkpoint's primitive (its name varies with the jax version) around
  # each half of the 3 blocks (pre, shortened, post).
  assert sum(_primitives(jaxpr)[name] for name in (
      'checkpoint', 'remat', 'remat2')) == 6
  expected = jax.jit(jax.value_and_grad(_loss_fn(plain)))(plain.weights, x)
  got = jax.jit(jax.value_and_grad(_loss_fn(remat)))(remat.weights, x)
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
  for g, e in zip(jax.tree_util.tree_leaves(got[1]),
                  jax.tree_util.tree_leaves(expected[1]), strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arg,value,allowed', [
    ('remat', 'all', "'none', 'blocks'"),
    ('dtype', 'float16', "'float32', 'bfloat16'"),
    ('dtype', 'bf', "'float32', 'bfloat16'")])
def test_bad_remat_or_dtype_names_the_value_and_what_works(arg, value, allowed):
  with pytest.raises(ValueError, match=re.escape(f'{arg}={value!r}; use one '
                                                 f'of {allowed}.')):
    th.HourglassLM(VOCAB, **{arg: value})


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_every_matrix_product_runs_in_the_compute_dtype(dtype):
  # Training's forward and backward passes; attention resampling too.
  model = _model('train', dtype=dtype, remat='blocks')
  x = _tokens()
  jaxpr = jax.make_jaxpr(jax.grad(_loss_fn(model)))(model.weights, x).jaxpr
  found = _operand_dtypes(jaxpr, ['dot_general'])
  assert sum(found.values()) > 50
  assert set(found) == {(dtype, dtype)}, found
  # Softmax (exp) and LayerNorm (its square root) in float32, and the logits.
  found = _operand_dtypes(jaxpr, ['exp', 'sqrt', 'rsqrt'])
  assert sum(found.values()) > 10
  assert set(found) == {('float32',)}, found
  logits = jax.eval_shape(lambda w: model.pure_fn(
      x, w, model.state, jax.random.PRNGKey(0))[0], model.weights)
  assert logits.dtype == jnp.float32


def test_bfloat16_weights_are_float32_and_load_both_ways():
  x = _tokens()
  # trax's original, whose checkpoints must still load.
  original = orig_hourglass.HourglassLM(
      VOCAB, **{k: v for k, v in TINY.items() if k != 'vocab_size'},
      mode='eval')
  original.init(shapes.signature(x))
  original.weights = configurations.redrawn(original.weights, 1, scale=0.3)
  half = th.load_trax_hourglass_weights(_model(dtype='bfloat16'),
                                        original.weights)
  full = _model()
  for leaf in jax.tree_util.tree_leaves(half.weights):
    assert leaf.dtype == np.float32
  full.weights = half.weights  # The same tree: nested weights load as they are.
  expected = _log_probs(original, x)
  np.testing.assert_allclose(_log_probs(full, x), expected, atol=1e-4)
  got = _log_probs(half, x)
  # bfloat16 keeps 8 significant bits: log-probs of a few units move by
  # ~1e-2 through a dozen roundings; a wrong weight would move them by ~1.
  assert 1e-4 < np.max(np.abs(got - expected)) < 0.1
  half.weights = full.weights
  np.testing.assert_array_equal(_log_probs(half, x), got)


def test_predict_mode_in_bfloat16_matches_eval_mode_in_bfloat16():
  args = dict(dropout=0.0)
  evaluator = _model(dtype='bfloat16', **args)
  evaluator.weights = configurations.redrawn(evaluator.weights, 2, scale=0.3)
  reference = _model(**args)
  reference.weights = evaluator.weights
  decoder = th.HourglassLM(mode='predict', max_len=LENGTH, dtype='bfloat16',
                           **dict(TINY, **args))
  decoder.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  decoder.weights = evaluator.weights
  caches = [s for s in jax.tree_util.tree_leaves(decoder.state)
            if s.ndim == 3]  # (batch * heads, keys, d_head)
  assert caches and all(c.dtype == jnp.bfloat16 for c in caches)
  x = _tokens(3)
  inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), x[:, :-1]], 1)
  fast = tl.Accelerate(decoder)
  got = jax.nn.log_softmax(np.concatenate(
      [np.asarray(fast(inputs[:, i:i + 1])) for i in range(LENGTH)], axis=1))
  half, full = _log_probs(evaluator, x), _log_probs(reference, x)
  # Predict mode runs the same products in bfloat16 in another order (one
  # query at a time, position terms from float32 tables): it rounds
  # differently, by about as much as bfloat16 differs from float32 at all,
  # so bound it by that gap, and far below a wrong position (~1).
  gap = np.max(np.abs(half - full))
  assert 1e-3 < gap < 0.1
  assert np.max(np.abs(got - half)) < 2 * gap
  assert np.max(np.abs(got - full)) < 2 * gap
  # And decoding.sample, from a prompt.
  tokens = decoding.sample(decoder, LENGTH - 4, prompt=x[:, :4],
                           temperature=0.0)
  assert tokens.shape == (BATCH, LENGTH - 4)
  assert 0 <= tokens.min() and tokens.max() < VOCAB


def test_activation_dtype_names_the_compute_precision():
  assert precision.activation_dtype(th.HourglassLM(VOCAB)) == 'float32'
  assert precision.activation_dtype(
      th.HourglassLM(VOCAB, dtype='bfloat16')) == 'bfloat16'
  assert precision.activation_dtype(trax.models.TransformerLM(VOCAB)) == (
      'float32')


def _train(tmp_path, name, steps, dtype, gin_files, bindings, capsys):
  """Trains with the trainer on a tiny corpus; (final eval loss, printed)."""
  corpus = tmp_path / 'corpus.txt'
  if not corpus.exists():
    words = np.random.RandomState(0).choice(
        ['def', 'return', 'self', 'x', 'in', 'for', 'if', '(', ')', ':'],
        size=4000)
    corpus.write_text(' '.join(words))
  args = [f'--config_file={f}' for f in gin_files] + [
      f'--output_dir={tmp_path / name}', '--dtype', dtype] + [
          f'--config={b}' for b in [
              'train.inputs = @trax_hourglass.byte_file_inputs',
              f"byte_file_inputs.path = '{corpus}'",
              f'train.steps = {steps}', f'train.eval_frequency = {steps}',
              'final_sample.length = 0', 'ProgressReporter.every_secs = 0',
              *bindings]]
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    loop = trainer.run(trainer._parse_args(args))  # pylint: disable=protected-access
  finally:
    gin.clear_config()
  return loop.history.get('eval', 'metrics/loss')[-1][1], capsys.readouterr().out


def _quickstart_losses(tmp_path, capsys, steps, bindings):
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    losses[dtype], printed = _train(tmp_path, dtype, steps, dtype,
                                    [QUICKSTART], bindings, capsys)
    assert re.search(rf'step {steps}/{steps} \| .* \| left [\d:]+ \| {dtype}',
                     printed)
  return losses


def _loop_losses(model, steps, seed=0):
  """Trains `model` with trax's Loop and Adam on tiny text; a loss per step."""
  text = np.frombuffer(b'def f(x):\n  return x + 1\n' * 8, np.uint8)
  x = (text[:BATCH * LENGTH * 4].astype(np.int32) % VOCAB).reshape(
      4, BATCH, LENGTH)
  batches = (  # pylint: disable=g-complex-comprehension
      (x[i % 4], x[i % 4], np.ones((BATCH, LENGTH), np.float32))
      for i in itertools.count())
  task = trax.supervised.training.TrainTask(
      batches, tl.WeightedCategoryCrossEntropy(), trax.optimizers.Adam(0.01),
      lr_schedule=trax.lr.constant(0.01))
  loop = th.Loop(
      model, [task], checkpoint_at=lambda step: False, random_seed=seed,
      callbacks=[functools.partial(runs.ProgressReporter, every_secs=0,
                                   total_steps=steps)])
  losses = []
  run_one_step = loop._run_one_step  # pylint: disable=protected-access

  def recording(*args, **kwargs):
    loss, stats = run_one_step(*args, **kwargs)
    losses.append(float(loss))
    return loss, stats

  loop._run_one_step = recording  # pylint: disable=protected-access
  loop.run(steps)
  return losses, loop


def test_bfloat16_trains_to_the_float32_loss(capsys):
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    losses[dtype], loop = _loop_losses(
        th.HourglassLM(mode='train', dtype=dtype, **TINY), 40)
    assert re.search(rf'step 40/40 \| .* \| left [\d:]+ \| {dtype}',
                     capsys.readouterr().out)
    # Adam updated float32 weights from float32 slots.
    for leaf in jax.tree_util.tree_leaves((loop.model.weights,
                                           loop._trainer_per_task[0].slots)):  # pylint: disable=protected-access
      assert leaf.dtype == np.float32
  assert losses['float32'][-1] < 0.5 * losses['float32'][0]
  # The mean of the last 5 steps: single steps of a noisy descent differ more.
  end = {dtype: np.mean(l[-5:]) for dtype, l in losses.items()}
  assert end['bfloat16'] == pytest.approx(end['float32'], rel=0.02)


@pytest.mark.slow
def test_quickstart_model_trains_in_bfloat16_to_the_float32_loss(
    tmp_path, capsys):
  # The quickstart model and optimizer on short sequences, 30 steps: the
  # loss has fallen well below log(256) = 5.5 by then.
  losses = _quickstart_losses(tmp_path, capsys, 30, [
      'byte_file_inputs.batch_size = 4',
      'byte_file_inputs.sequence_length = 64',
      'train.eval_steps = 2', 'multifactor.warmup_steps = 10'])
  assert losses['float32'] < 1.5
  assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=0.02)
  # Each run's checkpoint: float32 weights, which load into either precision.
  model_fn = runs.parse_run_config([QUICKSTART])
  try:
    for dtype in ('float32', 'bfloat16'):
      saved = checkpoints.read_checkpoint(str(tmp_path / dtype))
      assert {np.asarray(w).dtype for w in from_bits(saved.flat_weights)} == {
          np.dtype(np.float32)}
      other = 'bfloat16' if dtype == 'float32' else 'float32'
      model = th.load_trax_hourglass_weights(
          model_fn(mode='eval', dtype=other), str(tmp_path / dtype))
      assert precision.activation_dtype(model) == other
      for got, want in zip(jax.tree_util.tree_leaves(model.weights),
                           from_bits(saved.flat_weights), strict=True):
        np.testing.assert_array_equal(got, want)
  finally:
    gin.clear_config()


def test_trainer_refuses_dtype_for_a_model_without_one(tmp_path, capsys):
  gin.clear_config()
  try:
    code = trainer.main([
        '--config=train.model = @trax.models.TransformerLM',
        f'--output_dir={tmp_path}', '--dtype', 'bfloat16'])
  finally:
    gin.clear_config()
  assert code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      'trainer: error: --dtype bfloat16: train.model TransformerLM takes no '
      'dtype; use it with trax_hourglass.HourglassLM.')


def test_trainer_dtype_binds_the_models_dtype():
  gin.clear_config()
  try:
    gin.parse_config('import trax_hourglass\n'
                     'train.model = @trax_hourglass.HourglassLM\n')
    training._bind_dtype('bfloat16')  # pylint: disable=protected-access
    model_fn = gin.query_parameter('train.model').scoped_configurable_fn
    assert precision.activation_dtype(model_fn(vocab_size=VOCAB)) == 'bfloat16'
  finally:
    gin.clear_config()
