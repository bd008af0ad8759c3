"""Predict mode (one token per call, trax's decoding) of `HourglassLM`.

The layers that keep its state besides the attention caches (token counts, each
level's window and latest shortened vector), a level's step (fixed and
dynamic pooling), and the model.
"""

import jax
import numpy as np
import trax.layers as tl
from trax import shapes
from trax.fastmath import numpy as jnp
from trax.layers import base
from trax.layers.combinators import inputs_from_stack
from trax.layers.combinators import outputs_onto_stack

from trax_hourglass.layers.boundaries import LEARNED
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
    self._factor = shorten_factor
    self._mode = mode

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      batch, _, d = input_signature.shape
      self.state = (jnp.zeros((batch, self._factor, d), input_signature.dtype),
                    jnp.zeros((), jnp.int32))

  def forward(self, x):
    shift = self._factor - 1
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


def _sublayer_runner(level):
  """(index, rngs, run) for stepping parts of `level` in predict mode.

  index maps each sublayer (by id) to its place in level.sublayers, rngs holds
  one key per sublayer, and run(layers, stack, state) applies `layers` to the
  stack as tl.Serial would, updating state[i] of each.
  """
  index = {id(layer): i for i, layer in enumerate(level.sublayers)}
  rngs = jax.random.split(level.rng, len(level.sublayers))

  def run(layers, stack, state):
    for layer in layers:
      i = index[id(layer)]
      outputs, state[i] = layer.pure_fn(
          inputs_from_stack(stack, layer.n_in), level.weights[i], state[i],
          rngs[i], use_cache=True)
      stack = outputs_onto_stack(outputs, stack, layer.n_in)
    return stack
  return index, rngs, run


def shortened_level_step(level, xs):
  """One token through `level`, a `ShortenedLevel`, in predict mode.

  Its `shifting` and `upsampling` parts run at every token. Its `shortening`
  part runs (under `lax.cond`; a Python branch outside jit, see
  `layers.control_flow`) only when the level's token count is a multiple of
  k: then CausalShift's window, (batch, k, d_model), is the next complete
  shifted block. The k-1 tokens between take the shortened vector that
  LatestShortened holds in its state. Nested levels do the same at their own
  pace.
  """
  index, _, run = _sublayer_runner(level)
  state = list(level.state)
  # CausalShift's state: its window and the level's tokens before this one.
  _, n_done = state[index[id(level.shifting[-1])]]
  stack = run(level.shifting, xs, state)  # window: (batch, k, d_model), vecs
  window, rest = stack[0], stack[1:]
  every_kth = [index[id(layer)] for layer in level.shortening]

  def shorten(window_and_states):
    window, states = window_and_states
    inner = dict(zip(every_kth, states))
    short = run(level.shortening, window, inner)  # (batch, 1, d_model)
    return short, _in_structure_of(states, tuple(inner[i] for i in every_kth))

  def remember(window_and_states):
    _, states = window_and_states
    return states[-1], states  # LatestShortened's state: its latest input.

  short, states = control_flow.cond(
      n_done % level.shorten_factor == 0, shorten, remember,
      (window, tuple(state[i] for i in every_kth)))
  for i, layer_state in zip(every_kth, states):
    state[i] = layer_state
  stack = run(level.upsampling, (short,) + tuple(rest), state)
  level.state = tuple(state)
  return stack


def init_dynamic_level(level, input_signature):
  """Predict-mode weights and state of `level`, a `DynamicLevel`.

  input_signature: (vecs (batch, 1, d_model), toks (batch, 1), ...). As
  tl.Serial's init, but examples close segments at different tokens, so the
  shortened layers keep one state per example: initialised for one sequence
  and stacked, (batch, ...) before each leaf's own axes (each example's
  cache then has its own position). `SegmentPooling`'s state is the segment
  clock: per example the open segment's sum (batch, d_model) and length
  (batch,), the segments closed (batch,), and the latest shortened output
  (batch, d_model).
  """
  vecs = input_signature[0]
  batch, _, d_model = vecs.shape
  one_vec = shapes.ShapeDtype((batch, 1, d_model), vecs.dtype)
  pooling = level.pooling[1]
  weights, states, stack = [], [], input_signature
  for layer in level.sublayers:
    inputs = inputs_from_stack(stack, layer.n_in)
    if layer is level.middle:
      w, s = layer.init(shapes.ShapeDtype((1, 1, d_model), vecs.dtype),
                        use_cache=True)
      s = jax.tree_util.tree_map(lambda x: jnp.stack([x] * batch), s)
      outputs = one_vec
    else:
      w, s = layer.init(inputs, use_cache=True)
      outputs, _ = layer._forward_abstract(inputs)  # pylint: disable=protected-access
    if layer is pooling:  # One shortened vector at a time.
      zeros = jnp.zeros((batch, d_model), vecs.dtype)
      count = jnp.zeros((batch,), jnp.int32)
      s, outputs = (zeros, count, count, zeros), one_vec
    stack = outputs_onto_stack(outputs, stack, layer.n_in)
    weights.append(w)
    states.append(s)
  level.state = tuple(states)
  level.weights = tuple(weights)


def dynamic_level_step(level, xs):
  """One token through `level`, a `DynamicLevel`, in predict mode.

  xs: (vecs (batch, 1, d_model), toks (batch, 1), ...) -> (vecs, ...).
  The boundaries run on the token; its vector joins the open segment of its
  example (see `init_dynamic_level` for the state). The shortened layers
  step, one example at a time under `lax.while_loop`, only for the examples
  that need a new shortened position: at the first token (the null vector),
  and when the token closes a segment (its mean), while fewer than S-1
  segments are pooled (eval mode's bound; later positions keep the last
  output). Every token then takes its example's latest shortened output
  through `upsampling`, as eval mode's out[min(closed, S-1)].
  """
  index, rngs, run = _sublayer_runner(level)
  state = list(level.state)
  stack = run([level.boundaries], xs, state)  # vecs, ends (batch, 1)[, aux], ...
  vecs, ends = stack[:2]
  rest = stack[3:] if level.kind in LEARNED else stack[2:]  # No loss here.
  _, pooling, norm = level.pooling
  total, count, closed, latest = state[index[id(pooling)]]
  batch, _, d_model = vecs.shape
  ends = ends[:, 0] > 0.5  # (batch,)
  first = (count == 0) & (closed == 0)
  total = total + vecs[:, 0].astype(total.dtype)
  count = count + 1
  mean = total / (count[:, None].astype(total.dtype) + 1e-9)
  null = jnp.broadcast_to(level.weights[index[id(pooling)]], (batch, d_model))
  # Work items: every example's null vector, then every example's new mean.
  short = run([norm], jnp.concatenate([null, mean])[:, None], state)[:, 0]
  todo = jnp.concatenate([first, ends & (closed < level.max_shortened - 1)])
  order = jnp.argsort(~todo, stable=True)  # Items to do first, null first.
  middle = level.middle
  i_middle = index[id(middle)]

  def body(carry):
    i, middle_state, latest = carry
    item = order[i]
    example = item % batch
    one = jax.tree_util.tree_map(lambda x: x[example], middle_state)
    out, new = middle.pure_fn(short[item][None, None], level.weights[i_middle],
                              one, rngs[i_middle], use_cache=True)
    middle_state = jax.tree_util.tree_map(
        lambda x, v: x.at[example].set(v), middle_state,
        _in_structure_of(one, new))
    return i + 1, middle_state, latest.at[example].set(out[0, 0])

  _, state[i_middle], latest = control_flow.while_loop(
      lambda carry: carry[0] < jnp.sum(todo), body,
      (jnp.zeros((), jnp.int32), state[i_middle], latest))
  keep = ~ends[:, None]
  state[index[id(pooling)]] = (jnp.where(keep, total, 0),
                               jnp.where(ends, 0, count),
                               closed + ends.astype(closed.dtype), latest)
  # A one-vector shortened sequence: upsampling takes it for the token.
  stack = run(level.upsampling, (latest[:, None], vecs, stack[1]) +
              tuple(rest), state)
  level.state = tuple(state)
  return stack


def _in_structure_of(old_state, new_state):
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
      return _in_structure_of(state, self.state), logits[:, 0]

    state, logits = jax.lax.scan(step, self.state, toks.T)
    self.state = state
    return logits.transpose(1, 0, 2)  # (batch, len, vocab_size)
