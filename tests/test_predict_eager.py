"""Predict mode called outside jit, token by token, as trax's own tests do.

trax's `test_utils.test_eval_equals_predict` calls a predict-mode model
eagerly: `model(tokens[:, :3])`, then `model(token)` per position. Called so,
`HourglassLM` must compile nothing new once warm (its `lax.cond`s traced over
fresh closures compiled new executables at every token: ~1-10 s a token and
growing memory until the process aborted) and still equal eval mode; for
fixed and dynamic shortening, relative and rotary attention, and caches read
in several pieces.
"""

import jax
import jax.monitoring
import numpy as np
import pytest
from trax import shapes

import trax_hourglass as th
from trax_hourglass.layers import cache
import configurations  # pylint: disable=g-bad-import-order
from configurations import ATTENTION  # pylint: disable=g-bad-import-order

VOCAB, LENGTH, BATCH = 12, 12, 2
SPACES = (0, 3)  # Whitespace boundaries: 0 (the start token) and 3.
# The first call holds a prompt, as in trax's test_eval_equals_predict.
PROMPT = 3

# jax records every XLA compilation as this event, on both ends of our jax
# range (0.4.38 and 0.10.x): a listener counts them.
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_compilations = [0]


def _count_compilation(event, *unused_args, **unused_kwargs):
  if event == _COMPILE_EVENT:
    _compilations[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)

# Both attentions (with positions of their own) at both kinds of level.
MODELS = {
    'fixed': dict(hierarchy='1@2', vanilla_attn_type=ATTENTION['rotary']),
    'whitespace': dict(hierarchy='1@3', boundaries='whitespace',
                       boundary_tokens=SPACES,
                       middle_attn_type=ATTENTION['rotary']),
}


def _decode_eagerly(model, tokens):
  """Logits of `tokens` from trax's loop: 0 first, then the previous token."""
  inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), tokens[:, :-1]], 1)
  outputs = [np.asarray(model(inputs[:, :PROMPT]))]
  for t in range(PROMPT, LENGTH):
    outputs.append(np.asarray(model(inputs[:, t:t + 1])))
  return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize('name', [  # Dynamic levels: in the slow suite.
    pytest.param(n, marks=pytest.mark.slow) if n == 'whitespace' else n
    for n in sorted(MODELS)])
def test_eager_decoding_compiles_nothing_once_warm_and_equals_eval(
    name, monkeypatch):
  # Keys in pieces of 4: the 12-slot caches read 1, 2 or 3 of them (a
  # lax.switch under jit), the shortened ones 1 or 2.
  monkeypatch.setattr(cache, 'KEY_BLOCK', 4)
  args = dict(vocab_size=VOCAB, d_model=16, d_ff=32, n_heads=2, dropout=0.0,
              vanilla_layers=(1, 1), **MODELS[name])
  evaluator = th.HourglassLM(mode='eval', **args)
  evaluator.init(shapes.ShapeDtype((BATCH, LENGTH), np.int32))
  evaluator.weights = configurations.redrawn(evaluator.weights, 0)
  model = th.HourglassLM(mode='predict', max_len=LENGTH, **args)
  model.init(shapes.ShapeDtype((BATCH, 1), np.int32))
  model.weights = evaluator.weights
  fresh = model.state
  rng = np.random.RandomState(0)
  # Spaces in every row (segments of several lengths) and tokens that differ.
  tokens = rng.choice([1, 2, 3, 4, 5, 6, 3], size=(BATCH, LENGTH))
  tokens = tokens.astype(np.int32)

  before = _compilations[0]
  _decode_eagerly(model, tokens)  # Warm: every branch and shape seen once.
  assert _compilations[0] > before  # The listener hears compilations.

  model.state = fresh  # A second sequence, as long.
  before = _compilations[0]
  got = _decode_eagerly(model, tokens[::-1])
  assert _compilations[0] == before, (
      f'{_compilations[0] - before} new compilations over {LENGTH} tokens')
  np.testing.assert_allclose(got, np.asarray(evaluator(tokens[::-1])),
                             atol=1e-4)
