"""Predict mode: incremental decoding reproduces eval mode exactly.

Feeding 0, x0, x1, ... one token at a time to HourglassLM(mode='predict') must
give the eval-mode logits of x at every position, for every resampling type,
nested hierarchies, the attention swaps and sparse layers; with the weights of
the eval model loaded unchanged. Also: prompts in one call, batches,
`autoregressive_sample`, the max_len error, and shorten-factor dropout.
"""

import re

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest
import trax.layers as tl
from trax import shapes
from trax.supervised import decoding

import trax_hourglass as th
from trax_hourglass.layers import cache
from trax_hourglass.layers import predict_weights
import configurations  # pylint: disable=g-bad-import-order
from configurations import compiled_call  # pylint: disable=g-bad-import-order
from configurations import ATTENTION, SHORTENING, UPSAMPLING  # pylint: disable=g-bad-import-order

L = th.layers
VOCAB, LENGTH, BATCH = 11, 12, 2
HIERARCHIES = ['1@2', '2@3', '1@4', '1@2 1@4 1@2', '1@2 1@6 1@2', '1@3 1@6 1@3']


def _pair(max_len=LENGTH, **kwargs):
  """(eval model with random weights at scale 0.5, predict model, same weights).

  trax initialises the shared position biases at 1e-6, which would hide a
  wrong position layout; scale 0.5 makes every term count.
  """
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2, dropout=0.0)
  args.update(kwargs)
  evaluator = th.HourglassLM(mode='eval', **args)
  evaluator.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  evaluator.weights = configurations.redrawn(evaluator.weights, 0)
  decoder = th.HourglassLM(mode='predict', max_len=max_len, **args)
  decoder.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  decoder.weights = evaluator.weights  # Same tree, loads unchanged.
  return evaluator, decoder


def _tokens(seed=0, length=LENGTH):
  return np.random.RandomState(seed).randint(
      1, VOCAB, size=(BATCH, length)).astype(np.int32)


def _decoder_inputs(tokens):
  """trax's convention: 0 first, then the previous token."""
  return np.concatenate([np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], 1)


def _decode(decoder, tokens, chunks):
  """Logits of decoding `tokens` in calls of the given lengths."""
  fast, inputs, outputs, start = tl.Accelerate(decoder), _decoder_inputs(
      tokens), [], 0
  for size in chunks:
    outputs.append(np.asarray(fast(inputs[:, start:start + size])))
    start += size
  return np.concatenate(outputs, axis=1)


def test_one_token_at_a_time_equals_eval_mode():
  evaluator, decoder = _pair(hierarchy='2@1 2@3 2@1')
  tokens = _tokens()
  got = _decode(decoder, tokens, [1] * LENGTH)
  np.testing.assert_allclose(got, np.asarray(compiled_call(evaluator, tokens)),
                             atol=1e-4)


def test_a_prompt_in_one_call_then_tokens_equals_eval_mode():
  """autoregressive_sample feeds the prompt in one call: any split works."""
  evaluator, decoder = _pair(hierarchy='1@2 1@4 1@2', vanilla_layers=(0, 1))
  tokens = _tokens(1)
  got = _decode(decoder, tokens, [5, 1, 1, 5])  # Mid-block starts, 2 compiles.
  np.testing.assert_allclose(got, np.asarray(compiled_call(evaluator, tokens)),
                             atol=1e-4)


@hypothesis.settings(max_examples=2, deadline=None, derandomize=True,
                     phases=[hypothesis.Phase.generate])  # Shrinking recompiles.
@hypothesis.given(
    **configurations.configuration_strategies(HIERARCHIES),
    ff_sparsity=st.sampled_from([0, 4]),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_decode_exactly(
    hierarchy, vanilla, shortening, upsampling, vanilla_attn, middle_attn,
    ff_sparsity, seed):
  down, attn_down = SHORTENING[shortening]
  up, attn_up = UPSAMPLING[upsampling]
  evaluator, decoder = _pair(
      hierarchy=hierarchy, vanilla_layers=vanilla, downsampling_fn=down,
      upsampling_fn=up, attention_downsampling_fn=attn_down,
      attention_upsampling_fn=attn_up,
      vanilla_attn_type=ATTENTION[vanilla_attn],
      middle_attn_type=ATTENTION[middle_attn], ff_sparsity=ff_sparsity)
  tokens = _tokens(seed)
  got = _decode(decoder, tokens, [LENGTH])  # Token by token, under lax.scan.
  np.testing.assert_allclose(got, np.asarray(compiled_call(evaluator, tokens)),
                             atol=1e-4)


@pytest.mark.slow  # ~1 min: four nested models; run with `pytest -m slow`.
def test_every_resampling_and_attention_type_decodes_exactly():
  """Each type at least once, whatever hypothesis drew above."""
  for (shortening, upsampling), attention in zip(
      zip(sorted(SHORTENING), sorted(UPSAMPLING)),
      ['relative', 'softmax', 'performer', 'sparse_qkv']):
    down, attn_down = SHORTENING[shortening]
    up, attn_up = UPSAMPLING[upsampling]
    evaluator, decoder = _pair(
        hierarchy='1@2 1@6 1@2', downsampling_fn=down, upsampling_fn=up,
        attention_downsampling_fn=attn_down, attention_upsampling_fn=attn_up,
        middle_attn_type=ATTENTION[attention],
        vanilla_attn_type=ATTENTION['rotary' if attention == 'relative'
                                    else attention])
    tokens = _tokens(2)
    got = _decode(decoder, tokens, [LENGTH])
    np.testing.assert_allclose(
        got, np.asarray(compiled_call(evaluator, tokens)), atol=1e-4,
        err_msg=f'{shortening} / {upsampling} / {attention}')


@pytest.mark.parametrize('vanilla_attn', [
    'relative', pytest.param('rotary', marks=pytest.mark.slow)])
def test_caches_read_in_blocks_equal_eval_mode(monkeypatch, vanilla_attn):
  # Blocks of 5 keys: the 12-key caches take three, the last one shifted
  # back to fit (its keys already seen are masked); the short level takes one.
  monkeypatch.setattr(cache, 'KEY_BLOCK', 5)
  evaluator, decoder = _pair(hierarchy='1@3', vanilla_layers=(1, 1),
                             vanilla_attn_type=ATTENTION[vanilla_attn])
  tokens = _tokens(4)
  got = _decode(decoder, tokens, [LENGTH])
  np.testing.assert_allclose(got, np.asarray(compiled_call(evaluator, tokens)),
                             atol=1e-4)


@pytest.mark.parametrize('vanilla_attn,hierarchy,decode_every_form', [
    ('relative', '1@1 1@3 1@1', False),
    pytest.param('relative', '1@2 1@6 1@2', True, marks=pytest.mark.slow),
    pytest.param('rotary', '1@2 1@6 1@2', True, marks=pytest.mark.slow)])
def test_both_cache_forms_equal_eval_mode(monkeypatch, vanilla_attn, hierarchy,
                                          decode_every_form):
  # The CPU's pieces (of 5 keys here) and the accelerators' whole caches,
  # each chosen on the CPU: token by token and a prompt in one call. The
  # pieces are the CPU's default, which every other test here decodes with
  # (test_caches_read_in_blocks_equal_eval_mode at 5 keys): in the default
  # suite only the whole caches decode here; -m slow decodes both.
  monkeypatch.setattr(cache, 'KEY_BLOCK', 5)
  tokens = _tokens(5)
  for form in cache.FORMS:
    with cache.use_form(form):
      evaluator, decoder = _pair(hierarchy=hierarchy,
                                 vanilla_attn_type=ATTENTION[vanilla_attn])
    lengths = {x.shape[-2] for x in jax.tree_util.tree_leaves(decoder.state)
               if x.ndim >= 3}
    assert (12 in lengths) == (form == 'whole'), (form, lengths)
    if form != 'whole' and not decode_every_form:
      continue
    want = np.asarray(compiled_call(evaluator, tokens))
    for chunks in ([1] * LENGTH, [6, 6]):  # One compile each.
      decoder.state = _fresh(decoder, form)
      got = _decode(decoder, tokens, chunks)
      np.testing.assert_allclose(got, want, atol=1e-4,
                                 err_msg=f'{form} {chunks}')


def _fresh(decoder, form):
  """`decoder`'s state before any token, its caches of `form`."""
  weights = decoder.weights
  with cache.use_form(form):
    decoder.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  decoder.weights = weights
  return decoder.state


def test_past_max_len_raises_instead_of_returning_garbage():
  _, decoder = _pair(max_len=5, hierarchy='1@3')
  fast = tl.Accelerate(decoder)
  np.asarray(fast(np.zeros((BATCH, 5), np.int32)))  # 5 tokens: fine.
  with pytest.raises(ValueError, match=r'token number 6, past its max_len=5'):
    fast(np.zeros((BATCH, 1), np.int32))


def test_a_decode_step_has_no_host_callback():
  # The model checks max_len on the host, so its caches leave their overflow
  # callback out: an effect would send every jitted call of the step through
  # jax's slow Python dispatch (trax's loop makes one a token; issue 19).
  _, decoder = _pair(max_len=5, hierarchy='1@3', vanilla_layers=(1, 1),
                     vanilla_attn_type=ATTENTION['rotary'])
  step = jax.make_jaxpr(decoder.pure_fn)(
      np.zeros((BATCH, 1), np.int32), decoder.weights, decoder.state,
      decoder.rng)
  assert not step.effects


def test_a_decode_step_runs_no_loop():
  # Which cache pieces a step reads is chosen by a count, not by
  # jnp.searchsorted, whose loop was a while loop in every attention of the
  # step (on a GPU, XLA may copy a loop's condition to the host each turn).
  _, decoder = _pair(max_len=2 * cache.KEY_BLOCK + 1, hierarchy='1@3',
                     vanilla_layers=(1, 1))  # 3 pieces at full length.
  step = str(jax.make_jaxpr(decoder.pure_fn)(
      np.zeros((BATCH, 1), np.int32), decoder.weights, decoder.state,
      decoder.rng))
  assert 'cond[' in step  # The pieces' switch, and the shortened level's.
  assert 'while[' not in step and 'scan[' not in step


def test_decoding_weights_lay_the_position_kernel_out_by_head_once():
  # Relative attention reads its position kernel (16, 16) by head, (2, 16, 8):
  # decoding.sample's weights hold it so, made once per sampling call; trax's
  # layout (model.weights, as trax's own loop passes them) copies it per step.
  evaluator, decoder = _pair(hierarchy='1@2')  # 5 relative attentions.
  weights = predict_weights.decoding_weights(decoder)
  leaves = jax.tree_util.tree_leaves(weights)
  assert len([w for w in leaves if w.shape == (2, 16, 8)]) == 5
  assert len(leaves) == len(jax.tree_util.tree_leaves(decoder.weights))
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(
      predict_weights.decoding_weights(decoder)), leaves))
  tokens, fresh = _decoder_inputs(_tokens()), decoder.state

  def transposed_kernels(weights):
    step = jax.make_jaxpr(decoder.pure_fn)(tokens[:, :1], weights, fresh,
                                           decoder.rng)
    return len(re.findall(r'f32\[2,16,8\] = transpose', str(step)))

  assert transposed_kernels(decoder.weights) == 5
  assert transposed_kernels(weights) == 0
  step, state, logits = jax.jit(decoder.pure_fn), fresh, []
  for t in range(LENGTH):
    out, state = step(tokens[:, t:t + 1], weights, state, decoder.rng)
    logits.append(out)
  np.testing.assert_allclose(np.concatenate(logits, 1),
                             np.asarray(compiled_call(evaluator, _tokens())),
                             atol=1e-4)


@pytest.mark.smoke
def test_autoregressive_sample_continues_a_batch_of_prompts_greedily():
  evaluator, decoder = _pair(hierarchy='1@2', max_len=LENGTH)
  prompt = _tokens(3, length=4)
  sampled = decoding.autoregressive_sample(
      decoder, inputs=prompt, batch_size=BATCH, temperature=0.0,
      max_length=LENGTH - 4, eos_id=-1)
  assert sampled.shape == (BATCH, LENGTH - 4)
  sequence = np.concatenate([prompt, sampled], axis=1)
  # Greedy: each sampled token is the eval model's argmax given its prefix.
  logits = np.asarray(compiled_call(evaluator, sequence))
  np.testing.assert_array_equal(sampled, logits[:, 3:-1].argmax(-1))


def test_shorten_factor_dropout_trains_every_factor_and_loads_into_each():
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2, dropout=0.0,
              attention_upsampling_fn=L.NaiveUpsampling)
  trainer = th.HourglassLM(hierarchy='1@1 1@3 1@1', mode='train',
                           shorten_factor_dropout=(2, 3), **args)
  trainer.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  tokens = _tokens(4)
  by_factor = {}
  for k in (2, 3):  # The same weights work at each factor's hierarchy.
    evaluator = th.HourglassLM(hierarchy=f'1@1 1@{k} 1@1', mode='eval', **args)
    evaluator.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
    evaluator.weights = trainer.weights
    by_factor[k] = np.asarray(compiled_call(evaluator, tokens))
  assert np.abs(by_factor[2] - by_factor[3]).max() > 1e-3
  step = jax.jit(trainer.pure_fn)
  seen = set()
  for seed in range(8):  # Each training step runs one factor, drawn per step.
    out = np.asarray(step(tokens, trainer.weights, trainer.state,
                          jax.random.PRNGKey(seed))[0])
    matches = [k for k, ref in by_factor.items()
               if np.allclose(out, ref, atol=1e-4)]
    assert len(matches) == 1, 'a training step matched no factor'
    seen.add(matches[0])
  assert seen == {2, 3}


@pytest.mark.parametrize('kwargs, message', [
    (dict(shorten_factor_dropout=(2, 3)), 'LinearUpsampling'),
    (dict(shorten_factor_dropout=(2, 3), hierarchy='1@2 1@4 1@2',
          attention_upsampling_fn=L.NaiveUpsampling), 'exactly one shortened'),
    (dict(shorten_factor_dropout=(0, 3),
          attention_upsampling_fn=L.NaiveUpsampling), 'positive ints'),
    (dict(mode='predicting'), "mode='predicting'"),
    (dict(max_len=0), 'max_len=0'),
])
def test_bad_arguments_say_what_works(kwargs, message):
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2,
              hierarchy='1@3', mode='train')
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    th.HourglassLM(**args)


def test_cache_pieces_take_writes_across_their_ends_and_read_as_one(
    monkeypatch):
  monkeypatch.setattr(cache, 'KEY_BLOCK', 5)
  assert cache.piece_lengths(12) == [5, 5, 2]
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(2, 12, 3)).astype(np.float32)
  pieces = cache.zeros(dense.shape, np.float32)
  for start in (0, 3, 8, 11):  # Rows 3..7 and 8..10 straddle two pieces.
    pieces = cache.append(pieces, dense[:, start:start + 5], start)
  np.testing.assert_array_equal(np.concatenate(pieces, axis=1), dense)
  q = rng.normal(size=(2, 1, 3)).astype(np.float32)
  for n_visible in (1, 5, 7, 12):
    logits = np.einsum('bid,bjd->bij', q, dense[:, :n_visible])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum('bij,bjd->bid', probs / probs.sum(-1, keepdims=True),
                     dense[:, :n_visible])
    got = cache.attend(lambda keys: jax.numpy.einsum('bid,bjd->bij', q, keys),
                       pieces, pieces, jax.numpy.array([n_visible]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
