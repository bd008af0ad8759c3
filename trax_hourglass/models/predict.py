"""Predict mode (one token per call, trax's decoding) of `HourglassLM`.

The layers that keep its state besides the attention caches (token counts, each
level's window and latest shortened vector) and the model; each level steps
itself (see `models.levels`).
"""

import jax
import numpy as np
import trax.layers as tl
from trax import shapes
from trax.fastmath import numpy as jnp
from trax.layers import base

from trax_hourglass.layers import cache
from trax_hourglass.layers import control_flow
from trax_hourglass.layers.cache import PastMaxLenError


class CausalShift(base.Layer):
  """Shifts vectors right by k-1 before shortening by k, so nothing leaks.

  Shortened vector i then summarises tokens up to k*i (its block, shifted), and
  upsampled position t only sees shortened vectors of tokens <= t. Without the
  shift, position k*i would see token k*i + k - 1 of the future.

  train/eval: vecs (batch, len, d) -> (batch, len, d), shifted.
  predict: vec (batch, 1, d) -> (batch, k, d), the last k inputs: when the
  token count is a multiple of k, that is the next shifted block to shorten.
  """

  def __init__(self, shorten_factor, mode='train'):
    super().__init__(name=f'CausalShift({shorten_factor - 1})')
    self._shorten_factor = shorten_factor
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      batch, _, d = input_signature.shape
      self.state = (jnp.zeros((batch, self._shorten_factor, d),
                              input_signature.dtype),
                    jnp.zeros((), jnp.int32))

  def forward(self, x):
    shift = self._shorten_factor - 1
    if self._mode != 'predict':
      return jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :x.shape[1]]
    window, n_done = self.state
    window = jnp.concatenate([window[:, 1:], x.astype(window.dtype)], axis=1)
    self.state = (window, n_done + 1)
    return window


class LatestShortened(base.Layer):
  """Identity that, in predict mode, remembers the last shortened vector.

  The shortened layers run once every k tokens; the k-1 tokens between reuse
  this one (see `ShortenedLevel`).
  """

  def __init__(self, mode='train'):
    super().__init__(name='LatestShortened')
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros(input_signature.shape, input_signature.dtype)

  def forward(self, x):
    if self._mode == 'predict':
      self.state = x
    return x


def in_structure_of(old_state, new_state):
  """new_state's values in old_state's tree structure.

  lax.cond and lax.scan need one state structure in and out, but some trax
  layers relabel theirs after a first call (_RememberPad: {'init': ()} becomes
  {'forward': ()}, no leaves change).
  """
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(old_state),
                                      jax.tree_util.tree_leaves(new_state))


class TokenShift(base.Layer):
  """toks -> toks shifted right by one (train/eval), so token t predicts t+1.

  Predict mode follows trax: the caller feeds the previous token (0 first), so
  nothing shifts; the state counts the tokens fed (see `Autoregressive`).
  """

  def __init__(self, mode='train'):
    super().__init__(name='TokenShift')
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros((), jnp.int32)

  def forward(self, toks):
    if self._mode != 'predict':
      return jnp.pad(toks, ((0, 0), (1, 0)))[:, :-1]
    self.state = self.state + toks.shape[1]
    return toks


class Autoregressive(tl.Serial):
  """A predict-mode model (one token per call) that also takes longer inputs.

  trax's `autoregressive_sample` feeds a prompt in one call; the layers decode
  one token at a time, so a longer input runs them under `lax.scan`. Same
  sublayers, hence the same weights, as the `tl.Serial` of train/eval mode.
  The caches hold `max_len` tokens: a call that would go past them raises
  `PastMaxLenError` before it runs (a host-side check).
  """

  def __init__(self, *sublayers, max_len):
    super().__init__(*sublayers, name='HourglassLM')
    self._max_len = max_len
    self._counter = [isinstance(layer, TokenShift)
                     for layer in self.sublayers].index(True)

  @property
  def max_len(self):
    """The longest sequence it decodes: its caches' size."""
    return self._max_len

  def init_weights_and_state(self, input_signature):
    batch = input_signature.shape[0]
    super().init_weights_and_state(
        shapes.ShapeDtype((batch, 1), input_signature.dtype))
    self._init_batch = batch

  def has_fresh_state(self, batch_size):
    """Whether `state` is the one before any token, for `batch_size`
    sequences: then a sampler takes it as it is, without a new init (which
    draws all the weights again: seconds)."""
    counter = self.state[self._counter]
    return (getattr(self, '_init_batch', None) == batch_size and
            not isinstance(counter, dict) and int(counter) == 0)

  def pure_fn(self, x, weights, state, rng, use_cache=False):
    # Checked on the host: before the step, or (traced, as in trax's loop)
    # when the new state is set. So the caches leave their own check (a host
    # callback inside the computation) out, which keeps jax's fast dispatch.
    self._check_room(state[self._counter], x.shape[1])
    # trax re-raises any error inside a layer as its LayerError; going past
    # max_len is the caller's error and stays the ValueError it is.
    try:
      with cache.checked_by_caller():
        return super().pure_fn(x, weights, state, rng, use_cache=use_cache)
    except tl.LayerError as e:
      if isinstance(e.__context__, PastMaxLenError):
        raise e.__context__ from None
      raise

  @property
  def state(self):
    return tl.Serial.state.fget(self)

  @state.setter
  def state(self, state):
    tl.Serial.state.fset(self, state)
    self._check_room(state[self._counter], 0)

  def _check_room(self, n_done, n_new):
    """Raises PastMaxLenError (host side, when not traced) past max_len."""
    if isinstance(n_done, (jax.core.Tracer, dict)):
      return
    n_tokens = int(n_done) + n_new
    if n_tokens > self._max_len:
      raise PastMaxLenError(
          f'HourglassLM(mode="predict") got token number {n_tokens}, '
          f'past its max_len={self._max_len}: build it with a larger max_len '
          '(the caches grow with it) or start a new sequence.')

  def forward(self, toks):
    if toks.shape[1] == 1:
      return super().forward(toks)
    if not control_flow.is_traced(toks, self.state[self._counter]):
      # Called outside jit: a Python loop of the one-token step, whose
      # operations jax compiled once (a lax.scan over this call's fresh
      # `step` would compile anew). Sliced on the host: slicing a jax array
      # compiles one program per position.
      toks = np.asarray(toks)
      return jnp.concatenate([super(Autoregressive, self).forward(
          toks[:, i:i + 1]) for i in range(toks.shape[1])], axis=1)

    def step(state, tok):
      self.state = state
      logits = tl.Serial.forward(self, tok[:, None])
      return in_structure_of(state, self.state), logits[:, 0]

    state, logits = jax.lax.scan(step, self.state, toks.T)
    self.state = state
    return logits.transpose(1, 0, 2)  # (batch, len, vocab_size)
