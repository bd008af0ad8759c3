"""Causality and any-length inputs, property-based over random configurations.

Changing input token t must leave every output at positions <= t unchanged, for
every shortening, upsampling, hierarchy and attention type (LSH aside: its
sorted chunks depend on later keys, in trax's own layer too).
"""

import functools

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import trax.layers as tl
from trax import shapes

import trax_hourglass as th
from configurations import ATTENTION, SHORTENING, UPSAMPLING  # pylint: disable=g-bad-import-order
import configurations  # pylint: disable=g-bad-import-order
from configurations import compiled_call  # pylint: disable=g-bad-import-order

VOCAB, LENGTH, D_MODEL = 16, 24, 16  # Fixed shapes: compiled ops are reused.

HIERARCHIES = ['1@2', '1@3', '2@4', '1@6', '1@2 1@4 1@2', '1@2 1@6 1@2',
               '1@3 1@6 1@3', '1@2 1@4 1@8 1@4 1@2']


def _model(hierarchy, vanilla, shortening, upsampling, vanilla_attn,
           middle_attn):
  down, attn_down = SHORTENING[shortening]
  up, attn_up = UPSAMPLING[upsampling]
  model = th.HourglassLM(
      VOCAB, d_model=D_MODEL, d_ff=32, n_heads=2, vanilla_layers=vanilla,
      hierarchy=hierarchy, mode='eval', downsampling_fn=down,
      upsampling_fn=up, attention_downsampling_fn=attn_down,
      attention_upsampling_fn=attn_up, vanilla_attn_type=ATTENTION[vanilla_attn],
      middle_attn_type=ATTENTION[middle_attn])
  model.init(shapes.ShapeDtype((3, LENGTH), np.int32))
  return model


def _assert_causal(model, tokens, t, rng):
  """Rows: tokens, and tokens with token t changed (twice)."""
  batch = np.stack([tokens] * 3)
  batch[1, t] = (tokens[t] + 1 + rng.randint(VOCAB - 1)) % VOCAB
  batch[2, t:] = rng.randint(VOCAB, size=LENGTH - t)
  out = np.asarray(compiled_call(model, batch))
  for row in (1, 2):
    np.testing.assert_allclose(out[row, :t + 1], out[0, :t + 1], atol=1e-5,
                               err_msg=f'output <= {t} changed with token {t}')
  if t + 1 < LENGTH:  # The test can fail: a later output does change.
    assert np.abs(out[1, t + 1:] - out[0, t + 1:]).max() > 1e-4


def _causality_property(max_examples):
  @hypothesis.settings(max_examples=max_examples, deadline=None,
                       derandomize=True)
  @hypothesis.given(
      **configurations.configuration_strategies(HIERARCHIES),
      t=st.integers(0, LENGTH - 1),
      seed=st.integers(0, 2**16),
  )
  def test(hierarchy, vanilla, shortening, upsampling, vanilla_attn,
           middle_attn, t, seed):
    model = _model(hierarchy, vanilla, shortening, upsampling, vanilla_attn,
                   middle_attn)
    rng = np.random.RandomState(seed)
    _assert_causal(model, rng.randint(VOCAB, size=LENGTH).astype(np.int32), t,
                   rng)
  return test


# A model per example (most of the time): 4 examples by default (each
# resampling type is checked below), 30 with -m slow.
test_changing_token_t_leaves_outputs_up_to_t_unchanged = _causality_property(4)
test_causality_more_examples = pytest.mark.slow(_causality_property(30))


def test_every_shortening_and_upsampling_is_causal():
  """Each resampling type at least once, whatever hypothesis drew above."""
  rng = np.random.RandomState(0)
  for (shortening, upsampling) in zip(sorted(SHORTENING), sorted(UPSAMPLING)):
    model = _model('1@2 1@6 1@2', (1, 1), shortening, upsampling, 'relative',
                   'relative')
    tokens = rng.randint(VOCAB, size=LENGTH).astype(np.int32)
    for t in (0, 4, 5, 11, 17):
      _assert_causal(model, tokens, t, rng)


def test_lsh_is_causal_when_one_chunk_covers_the_sequence():
  """Chunked LSH sorts keys by hash, so a later key can move an earlier one
  into another chunk: not exactly prefix-invariant (in trax's layer too). With
  one chunk over the whole sequence, the causal mask alone decides."""
  lsh = functools.partial(tl.LSHSelfAttention, chunk_len=LENGTH, n_hashes=1,
                          n_chunks_before=0, n_chunks_after=0)
  model = th.HourglassLM(VOCAB, d_model=D_MODEL, d_ff=32, n_heads=2,
                         hierarchy='1@3', mode='eval', vanilla_attn_type=lsh)
  model.init(shapes.ShapeDtype((3, LENGTH), np.int32))
  state = model.state
  rng = np.random.RandomState(1)
  tokens = rng.randint(VOCAB, size=LENGTH).astype(np.int32)
  for t in (0, 7, 15):
    model.state = state  # LSH keeps an rng in its state: fix it.
    _assert_causal(model, tokens, t, rng)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(length=st.integers(1, 29), seed=st.integers(0, 2**16))
def test_any_length_gives_the_prefix_of_a_longer_input(length, seed):
  """Inputs of any length work, and padding leaks nothing into them."""
  model = _any_length_model()
  tokens = np.random.RandomState(seed).randint(VOCAB, size=(2, 30)).astype(
      np.int32)
  full = np.asarray(compiled_call(model, tokens))
  part = np.asarray(compiled_call(model, tokens[:, :length]))
  assert part.shape == (2, length, VOCAB)
  np.testing.assert_allclose(part, full[:, :length], atol=1e-5)


@functools.lru_cache(maxsize=None)
def _any_length_model():
  model = th.HourglassLM(VOCAB, d_model=D_MODEL, d_ff=32, n_heads=2,
                         hierarchy='1@2 1@6 1@2', mode='eval')
  model.init(shapes.ShapeDtype((2, 6), np.int32))
  return model
