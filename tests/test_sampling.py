"""Sampling (`trax_hourglass.decoding`) and the `hourglass-sample` script.

One tiny byte-level HourglassLM, built from gin bindings, gets a real
checkpoint from a trax `training.Loop` (crash-safe, as the trainer saves it)
and the `config.gin` that trax writes (gin's operative config); every test
shares it, and its predict-mode model is loaded once, so compiled steps are
reused. (The trainer's own config.gin is parsed the same way by
hourglass-eval's test in test_trainer.py.)
"""

import gc
import os
import re

# First: its compat fixes must apply before trax is imported (import time).
import trax_hourglass  # pylint: disable=g-bad-import-order

import gin
import jax
import numpy as np
import pytest
from trax.data import inputs as trax_inputs

from trax_hourglass import decoding
from trax_hourglass.cli import sample as sample_cli
import configurations  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_GIN = """
train.model = @trax_hourglass.HourglassLM
trax_hourglass.HourglassLM.vocab_size = 256
trax_hourglass.HourglassLM.d_model = {d_model}
trax_hourglass.HourglassLM.d_ff = 32
trax_hourglass.HourglassLM.n_heads = 2
trax_hourglass.HourglassLM.vanilla_layers = (1, 1)
trax_hourglass.HourglassLM.hierarchy = '1@2'
trax_hourglass.HourglassLM.dropout = 0.0
"""
MAX_LEN = 64
BUFFER = 32  # Eval-model reference: one fixed (2, BUFFER) input, one compile.


def _run_cli(main, args):
  gin.clear_config()
  trax_inputs.data_counters = {}
  try:
    return main(args)
  finally:
    gin.clear_config()


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A training output dir: a Loop's checkpoint (step 0) and config.gin."""
  return configurations.save_run(
      str(tmp_path_factory.mktemp('sampling') / 'run'),
      TINY_GIN.format(d_model=16))


@pytest.fixture(scope='module')
def models(run_dir):
  """(predict model, jitted eval-mode forward) with the run's weights."""
  return configurations.run_models(run_dir, MAX_LEN)


def _eval_logits(evaluate, seqs):
  """Eval-mode logits (2, BUFFER, vocab) of seqs (2, <= BUFFER), zero-padded;
  causal, so the padding changes no logit of seqs."""
  seqs = np.asarray(seqs, np.int32)
  return evaluate(np.pad(seqs, ((0, 0), (0, BUFFER - seqs.shape[1]))))


def _greedy_by_eval_model(evaluate, prompt, n_tokens):
  """Greedy continuation of prompt (2, P): argmax of the eval model's logits
  at the end of the growing sequence."""
  seqs = np.asarray(prompt, np.int32)
  for _ in range(n_tokens):
    # Logits at position t predict token t: the model shifts right itself.
    logits = _eval_logits(evaluate, np.pad(seqs, ((0, 0), (0, 1))))
    seqs = np.concatenate(
        [seqs, logits[:, seqs.shape[1]].argmax(-1)[:, None]], axis=1)
  return seqs[:, -n_tokens:]


PROMPT = np.array([[116, 104, 101, 32], [113, 117, 105, 99]])  # 'the ', 'quic'


def test_greedy_equals_eval_model_argmax_on_the_growing_sequence(models):
  predict, evaluate = models
  tokens = decoding.sample(predict, 20, prompt=PROMPT, temperature=0)
  assert tokens.shape == (2, 20) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens,
                                _greedy_by_eval_model(evaluate, PROMPT, 20))
  # From nothing (start token only), a batch of identical sequences.
  alone = decoding.sample(predict, 12, batch_size=2, temperature=0)
  np.testing.assert_array_equal(
      alone, _greedy_by_eval_model(evaluate, np.zeros((2, 0)), 12))
  # top_k=1 leaves only the argmax, at any temperature.
  np.testing.assert_array_equal(
      decoding.sample(predict, 20, prompt=PROMPT, temperature=3.0, top_k=1,
                      seed=5), tokens)


def test_sampling_is_deterministic_per_seed(models):
  predict, _ = models
  a = decoding.sample(predict, 30, prompt=PROMPT, seed=1)
  b = decoding.sample(predict, 30, prompt=PROMPT, seed=1)
  c = decoding.sample(predict, 30, prompt=PROMPT, seed=2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a[0] != a[1]).any()
  assert a.min() >= 0 and a.max() < 256
  # A 1-D prompt goes to every sequence of the batch.
  np.testing.assert_array_equal(
      decoding.sample(predict, 30, prompt=PROMPT[0], batch_size=2, seed=1)[0],
      a[0])


def test_sampling_keeps_one_copy_of_the_caches(models):
  """After sampling, the model's state is the only state of its size alive:
  the empty caches are made inside the first compiled call, none is kept."""
  predict, _ = models
  gc.collect()
  before = sum(x.nbytes for x in jax.live_arrays())
  decoding.sample(predict, 3, batch_size=64, seed=0)  # Caches >> weights.
  gc.collect()
  grown = sum(x.nbytes for x in jax.live_arrays()) - before
  state = sum(x.nbytes for x in jax.tree_util.tree_leaves(predict.state))
  assert 0.5 * state < grown < 1.5 * state, (grown, state)


def test_top_k_samples_only_the_k_most_likely(models):
  predict, evaluate = models
  n = 8
  tokens = decoding.sample(predict, n, prompt=PROMPT, top_k=3, seed=0,
                           temperature=10.0)  # Near-uniform over the top 3.
  logits = _eval_logits(evaluate, np.concatenate([PROMPT, tokens], axis=1))
  step_logits = logits[:, PROMPT.shape[1]:PROMPT.shape[1] + n]
  top3 = np.argsort(step_logits, axis=-1)[..., -3:]
  assert (tokens[..., None] == top3).any(-1).all()
  assert (tokens != step_logits.argmax(-1)).any()  # Not only the argmax.


def test_progress_is_reported_with_tokens_per_second(models):
  predict, _ = models
  calls = []
  decoding.sample(predict, 40, batch_size=2, seed=3,
                  progress=lambda *a: calls.append(a))
  assert calls and calls[-1][:2] == (40, 40) and calls[-1][2] > 0
  assert all(0 < done <= total == 40 for done, total, _ in calls)


def test_bad_arguments_say_what_works(models):
  predict, _ = models
  with pytest.raises(ValueError, match=r'past the model\'s max_len=64: ask '
                     r'for at most 60 tokens'):
    decoding.sample(predict, 61, prompt=PROMPT)
  with pytest.raises(ValueError, match='n_tokens=0'):
    decoding.sample(predict, 0)
  with pytest.raises(ValueError, match='temperature=-1'):
    decoding.sample(predict, 3, temperature=-1)
  with pytest.raises(ValueError, match='top_k=0'):
    decoding.sample(predict, 3, top_k=0)
  with pytest.raises(ValueError, match=r'prompt has shape \(2, 4\); use'):
    decoding.sample(predict, 3, prompt=PROMPT, batch_size=3)
  with pytest.raises(ValueError, match='integer token ids'):
    decoding.sample(predict, 3, prompt=np.ones((1, 2)))


def test_load_predict_model_from_weights(models):
  predict, _ = models
  kwargs = dict(vocab_size=256, d_model=16, d_ff=32, n_heads=2,
                hierarchy='1@2', dropout=0.0)
  model = decoding.load_predict_model(predict.weights, max_len=8, **kwargs)
  assert model._max_len == 8  # pylint: disable=protected-access
  for a, b in zip(jax.tree_util.tree_leaves(model.weights),
                  jax.tree_util.tree_leaves(predict.weights)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r'do not fit the model built from '
                     r'arguments .*d_model.: 32'):
    decoding.load_predict_model(predict.weights, **dict(kwargs, d_model=32))
  with pytest.raises(ValueError, match='cannot build the model .*vocab_size'):
    decoding.load_predict_model(predict.weights)
  with pytest.raises(FileNotFoundError, match='/no/such/run does not exist'):
    decoding.load_predict_model('/no/such/run')


def test_complete_images_keeps_the_top_half_and_draws_a_grid(models,
                                                             tmp_path):
  predict, _ = models
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 4, 4, 3), np.uint8)
  done = decoding.complete_images(predict, images, seed=0)
  assert done.shape == images.shape and done.dtype == np.uint8
  np.testing.assert_array_equal(done[:, :2], images[:, :2])
  assert (done[:, 2:] != images[:, 2:]).any()
  # Raster order, channels interleaved: the same as sampling the flat tokens.
  flat = images.reshape(2, -1).astype(np.int32)
  np.testing.assert_array_equal(
      done.reshape(2, -1)[:, 24:],
      decoding.sample(predict, 24, prompt=flat[:, :24], seed=0))

  grid = decoding.image_grid(images, done)
  assert grid.shape == (2 * 4 + 3 * 2, 2 * 4 + 3 * 2, 3)
  np.testing.assert_array_equal(grid[2:6, 8:12], images[1])  # Row 0, col 1.
  np.testing.assert_array_equal(grid[8:12, 2:6], done[0])  # Row 1, col 0.
  assert (grid[:2] == 255).all() and (grid[:, 6:8] == 255).all()
  assert decoding.image_grid(images, np.stack([done, done])).shape[0] == 20
  with pytest.raises(ValueError, match='must be'):
    decoding.image_grid(images, done[:1])


def test_save_png_with_pil_and_with_tensorflow(tmp_path, monkeypatch):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
  path = decoding.save_png(image, tmp_path / 'sub' / 'a.png')
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  monkeypatch.setitem(__import__('sys').modules, 'PIL', None)  # No PIL.
  path = decoding.save_png(image[..., :1], tmp_path / 'b.png')
  monkeypatch.undo()
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image[..., 0])
  with pytest.raises(ValueError, match='uint8'):
    decoding.save_png(image.astype(np.float32), tmp_path / 'c.png')


def test_hourglass_sample_text(run_dir, models, capsys):
  _, evaluate = models
  assert _run_cli(sample_cli.main, [
      '--output_dir', run_dir, '--prompt', 'the ', '--n_tokens', '12',
      '--temperature', '0', '--batch_size', '2']) == 0
  captured = capsys.readouterr()
  expected = _greedy_by_eval_model(evaluate, PROMPT[[0, 0]], 12)[0]
  text = (b'the ' + bytes(expected.astype(np.uint8))).decode(
      'utf-8', errors='replace')
  assert captured.out == (f'--- sample 1/2 ---\n{text}\n'
                          f'--- sample 2/2 ---\n{text}\n')
  assert re.search(r'\[12/12 bytes\] [\d,.]+ tokens/s', captured.err)


def test_hourglass_sample_images_from_a_checkpoint_file(run_dir, tmp_path,
                                                        capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  npz = tmp_path / 'images.npz'
  test_images = rng.integers(0, 256, (3, 4, 4, 3), np.uint8)
  np.savez(npz, train_images=test_images[:1], test_images=test_images)
  out = tmp_path / 'grid.png'
  # trax's own reader (--original) takes our checkpoint too: same format.
  assert _run_cli(sample_cli.main, [
      '--checkpoint', os.path.join(run_dir, 'model.pkl.gz'), '--original',
      '--config_file', os.path.join(run_dir, 'config.gin'),
      '--images', str(npz), '--n_images', '2', '--out', str(out),
      '--top_k', '4', '--seed', '1']) == 0
  captured = capsys.readouterr()
  assert f'Wrote {out}' in captured.out
  assert re.search(r'\[24/24 subpixels\]', captured.err)
  grid = np.asarray(Image.open(out))
  assert grid.shape == (14, 14, 3)
  np.testing.assert_array_equal(grid[2:6, 2:6], test_images[0])
  np.testing.assert_array_equal(grid[8:10, 2:6], test_images[0, :2])


def test_hourglass_sample_errors_are_clear(run_dir, tmp_path, capsys):
  def error(*args):
    assert _run_cli(sample_cli.main, list(args)) == 1
    return capsys.readouterr().err

  assert '--output_dir /no/such/run does not exist' in error(
      '--output_dir', '/no/such/run')
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert 'there is no' in error('--output_dir', str(empty))
  (empty / 'config.gin').write_text(
      open(os.path.join(run_dir, 'config.gin')).read())
  assert f'no checkpoint model.pkl.gz in {empty}' in error(
      '--output_dir', str(empty))
  assert '--original needs --config_file' in error(
      '--output_dir', run_dir, '--original')
  assert '--n_tokens=0' in error('--output_dir', run_dir, '--n_tokens', '0')
  assert 'is a directory' in error('--checkpoint', run_dir)
  wider = tmp_path / 'wider.gin'
  wider.write_text(TINY_GIN.format(d_model=32))
  err = error('--output_dir', run_dir, '--config_file', str(wider))
  assert re.search(r'do not fit the model built from config .*wider.gin: '
                   r'Weight array \d+ .* has shape', err), err
  assert 'test_images' in error('--output_dir', run_dir, '--images',
                                str(_npz_without_test_images(tmp_path)))


def _npz_without_test_images(tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, images=np.zeros((1, 2, 2, 3), np.uint8))
  return path


def test_setup_registers_hourglass_sample():
  setup = open(os.path.join(REPO, 'setup.py')).read()
  assert "'hourglass-sample=trax_hourglass.cli.sample:main'" in setup
  assert 'hourglass-demo' not in setup


def test_temperature_sample_is_pure_and_draws_what_sample_draws(models):
  """The sampler takes weights, state, prompt and key, and gives tokens and
  state: twice the same, `model.state` untouched; `decoding.sample` (which
  chunks it) draws the same tokens and leaves the same state."""
  from trax_hourglass import sampling  # pylint: disable=g-import-not-at-top
  from trax_hourglass.layers import predict_weights  # pylint: disable=g-import-not-at-top
  predict, _ = models
  weights = predict_weights.decoding_weights(predict)
  state = decoding.fresh_state(predict, 2)
  before = jax.tree_util.tree_leaves(predict.state)
  draw = jax.jit(lambda w, s, p, k: sampling.temperature_sample(
      predict, w, s, p, k, 12, temperature=1.5, top_k=8))
  a, state_a = draw(weights, state, PROMPT, jax.random.PRNGKey(4))
  b, state_b = draw(weights, state, PROMPT, jax.random.PRNGKey(4))
  assert all(x is y for x, y in zip(
      jax.tree_util.tree_leaves(predict.state), before))
  np.testing.assert_array_equal(a, b)
  for x, y in zip(jax.tree_util.tree_leaves(state_a),
                  jax.tree_util.tree_leaves(state_b)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(
      decoding.sample(predict, 12, prompt=PROMPT, temperature=1.5, top_k=8,
                      seed=4), a)
  for x, y in zip(jax.tree_util.tree_leaves(predict.state),
                  jax.tree_util.tree_leaves(state_a)):
    np.testing.assert_array_equal(x, y)


def test_sample_without_a_prompt_traces_the_step_once(models, monkeypatch):
  """No prompt: the start token goes through the decoding call, so the
  model's step is traced (and compiled) once, not for a prefill and again
  for the loop; the tokens and state are `temperature_sample`'s."""
  from trax_hourglass import sampling  # pylint: disable=g-import-not-at-top
  from trax_hourglass.layers import predict_weights  # pylint: disable=g-import-not-at-top
  predict, _ = models
  model = decoding.load_predict_model(  # A model of its own: none compiled.
      predict.weights, max_len=8, vocab_size=256, d_model=16, d_ff=32,
      n_heads=2, hierarchy='1@2', dropout=0.0)
  traces, pure_fn = [], type(model).pure_fn
  monkeypatch.setattr(type(model), 'pure_fn', lambda self, *a, **kw: (
      traces.append(self) or pure_fn(self, *a, **kw)))
  tokens = decoding.sample(model, 5, temperature=1.5, seed=7)
  assert sum(t is model for t in traces) == 1
  want, state = jax.jit(lambda w, s, k: sampling.temperature_sample(
      model, w, s, np.zeros((1, 0), np.int32), k, 5, temperature=1.5))(
          predict_weights.decoding_weights(model),
          decoding.fresh_state(model), jax.random.PRNGKey(7))
  np.testing.assert_array_equal(tokens, want)
  for x, y in zip(jax.tree_util.tree_leaves(model.state),
                  jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(x, y)


def test_sample_takes_a_fresh_state_as_it_is(models, monkeypatch):
  """A model just initialized is sampled from its own state, not
  initialized again (which draws every weight anew: seconds for a real
  model); one initialized for another batch size is, as before."""
  from trax import shapes  # pylint: disable=g-import-not-at-top
  predict, _ = models
  kwargs = dict(vocab_size=256, d_model=16, d_ff=32, n_heads=2,
                hierarchy='1@2', dropout=0.0, mode='predict', max_len=8)
  fresh, other = (trax_hourglass.HourglassLM(**kwargs) for _ in range(2))
  for model, batch in ((fresh, 1), (other, 2)):
    model.init(shapes.ShapeDtype((batch, 1), np.int32))
    model.weights = predict.weights
  inits, init = [], type(fresh).init
  monkeypatch.setattr(type(fresh), 'init', lambda self, *a, **kw: (
      inits.append(self) or init(self, *a, **kw)))
  tokens = decoding.sample(fresh, 4, seed=2)
  assert not any(m is fresh for m in inits)
  np.testing.assert_array_equal(decoding.sample(other, 4, seed=2), tokens)
  assert sum(m is other for m in inits) == 1


def test_hourglass_sample_parses_the_config_once(run_dir, monkeypatch,
                                                 capsys):
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top
  parsed = []
  parse = runs.parse_config_safely
  monkeypatch.setattr(runs, 'parse_config_safely',
                      lambda *a, **k: parsed.append(a[0]) or parse(*a, **k))
  assert _run_cli(sample_cli.main, ['--output_dir', run_dir, '--n_tokens',
                                    '2', '--temperature', '0']) == 0
  assert len(parsed) == 1, parsed
  assert capsys.readouterr().out.strip()


def test_a_dynamic_run_decodes_with_the_bound_it_was_trained_with(tmp_path):
  # Sampling sizes the caches by the sequence asked for (max_len), but a
  # dynamic level's bound on segments counts from the model's max_len.
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top
  from trax_hourglass.models import levels  # pylint: disable=g-import-not-at-top
  config = tmp_path / 'config.gin'
  config.write_text(
      'train.model = @trax_hourglass.HourglassLM\n'
      'trax_hourglass.HourglassLM.vocab_size = 256\n'
      'trax_hourglass.HourglassLM.max_len = 96\n'
      "trax_hourglass.HourglassLM.hierarchy = '1@1 1@3 1@1'\n")
  try:
    for boundaries, want in (('fixed', 24), ('whitespace', 96)):
      run = runs.read_config([str(config)], [
          f"trax_hourglass.HourglassLM.boundaries = '{boundaries}'"])
      model = run.build('predict', max_len=24)
      found = [l for l in _sublayers(model) if getattr(l, 'max_len', None)]
      assert found and found[0].max_len == want, boundaries
      bound = [l.max_shortened for l in _sublayers(model)
               if isinstance(l, levels.DynamicLevel)]
      assert bound == ([] if boundaries == 'fixed' else [
          l.max_shortened for l in _sublayers(run.build('eval'))
          if isinstance(l, levels.DynamicLevel)])
  finally:
    gin.clear_config()


def _sublayers(layer):
  yield layer
  for sublayer in layer.sublayers:
    yield from _sublayers(sublayer)


def test_run_config_gives_the_vocab_size_gin_calls_the_model_with(tmp_path):
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top
  config = tmp_path / 'config.gin'
  config.write_text(
      'VOCAB = 300\n'
      'train.model = @big/trax_hourglass.HourglassLM\n'
      'trax_hourglass.HourglassLM.vocab_size = 256\n'
      'big/trax_hourglass.HourglassLM.vocab_size = %VOCAB\n')
  try:
    assert runs.read_config([str(config)]).vocab_size == 300
    assert runs.read_config(
        [str(config)], ['big/trax_hourglass.HourglassLM.vocab_size = 64']
    ).vocab_size == 64
    assert runs.read_config([str(config)], vocab_size=8).vocab_size == 8
  finally:
    gin.clear_config()
