"""The shortened levels of `HourglassLM`: fixed and dynamic pooling.

Each level is a `tl.Serial` (its weights are those of its sublayers, in
order) that keeps references to its parts by name and runs its own predict
mode (one token per call): the shortened layers step only when a shortened
position is complete.
"""

import jax
from trax import shapes
import trax.layers as tl
from trax.fastmath import numpy as jnp
from trax.layers.combinators import inputs_from_stack
from trax.layers.combinators import outputs_onto_stack

from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers import control_flow
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.models.predict import CausalShift
from trax_hourglass.models.predict import LatestShortened
from trax_hourglass.models.predict import in_structure_of


class ShortenedLevel(tl.Serial):
  """vecs -> vecs + upsample(middle(shorten(shift(vecs)))), one hourglass level.

  vecs: (batch, len, d_model). Its sublayers, in the order of its weights:
  Dup, `shift` (CausalShift), `pooling` (the shortening), `middle` (the
  shortened layers), `latest` (LatestShortened), `upsampling`, LayerNorm,
  Add. `shortening` names the three in between, (pooling, middle, latest): in
  predict mode (one token per call) they run only every k-th token of the
  level, when a shortened position is complete (see `_predict_step`).
  """

  def __init__(self, shorten_factor, pooling, middle, upsampling,
               mode='train', shorten_factor_dropout=()):
    self._shift = CausalShift(shorten_factor, mode)
    self._pooling = tl.Serial(pooling)
    self._middle = tl.Serial(middle)
    self._latest = LatestShortened(mode)
    self._upsampling = tl.Serial(upsampling)
    self._shifting = (tl.Dup(),  # vecs, vecs
                      self._shift)  # shifted, vecs
    self._shortening = (
        self._pooling,  # short: (batch, len/k, d_model), vecs
        self._middle,  # short, vecs
        self._latest)  # short, vecs
    self._merging = (
        self._upsampling,  # up: (batch, len, d_model), vecs
        LayerNorm(),  # up, vecs
        tl.Add())  # vecs: up + vecs
    super().__init__(self._shifting, self._shortening, self._merging,
                     name=f'ShortenedLevel({shorten_factor})')
    self._shorten_factor = shorten_factor
    self._mode = mode
    # Shorten-factor dropout: the same level built at other factors, with the
    # same weight layout; training runs one, drawn per step, on our weights.
    self._shorten_factor_dropout = tuple(shorten_factor_dropout)

  shorten_factor = property(lambda self: self._shorten_factor)
  shift = property(lambda self: self._shift)
  pooling = property(lambda self: self._pooling)
  middle = property(lambda self: self._middle)
  latest = property(lambda self: self._latest)
  upsampling = property(lambda self: self._upsampling)
  shortening = property(lambda self: self._shortening)

  def forward(self, xs):
    if self._shorten_factor_dropout and self._mode == 'train':
      return self._forward_random_factor(xs)
    if self._mode == 'predict':
      return self._predict_step(xs)
    return super().forward(xs)

  def _forward_random_factor(self, xs):
    """One level per factor in one compiled step; lax.switch runs one of them."""
    choice_rng, rng = jax.random.split(self.rng)
    weights, state = self.weights, self.state

    def branch(level):
      def run(xs):
        return level.pure_fn(xs, weights, state, rng, use_cache=True)[0]
      return run

    levels = self._shorten_factor_dropout
    choice = jax.random.randint(choice_rng, (), 0, len(levels))
    return control_flow.switch(choice, [branch(level) for level in levels], xs)

  def _predict_step(self, xs):
    """One token through the level in predict mode.

    The shift (Dup, `shift`) and the merge (`upsampling`, LayerNorm, Add)
    run at every token. `shortening` runs (under `lax.cond`; a Python branch
    outside jit, see `layers.control_flow`) only when the level's token count
    is a multiple of k: then CausalShift's window, (batch, k, d_model), is
    the next complete shifted block. The k-1 tokens between take the
    shortened vector that `latest` holds in its state. Nested levels do the
    same at their own pace.
    """
    index, _, run = _sublayer_runner(self)
    state = list(self.state)
    # CausalShift's state: its window and the level's tokens before this one.
    _, n_done = state[index[id(self._shift)]]
    stack = run(self._shifting, xs, state)  # window: (batch, k, d_model), vecs
    window, rest = stack[0], stack[1:]
    every_kth = [index[id(layer)] for layer in self._shortening]
    i_latest = index[id(self._latest)]

    def shorten(window_and_states):
      window, states = window_and_states
      inner = dict(zip(every_kth, states))
      short = run(self._shortening, window, inner)  # (batch, 1, d_model)
      return short, in_structure_of(states, tuple(inner[i] for i in every_kth))

    def remember(window_and_states):
      _, states = window_and_states
      # LatestShortened's state: its latest input.
      return dict(zip(every_kth, states))[i_latest], states

    short, states = control_flow.cond(
        n_done % self._shorten_factor == 0, shorten, remember,
        (window, tuple(state[i] for i in every_kth)))
    for i, layer_state in zip(every_kth, states):
      state[i] = layer_state
    stack = run(self._merging, (short,) + tuple(rest), state)
    self.state = tuple(state)
    return stack


class DynamicLevel(tl.Serial):
  """(vecs, toks) -> vecs + upsample(middle(pool(vecs, ends))), at boundaries.

  Dynamic pooling (see `layers.boundaries`): vecs (batch, len, d_model), toks
  (batch, len) the level's input tokens (shifted: position t holds token
  t-1). Learned boundaries also leave aux (batch, len) on the stack for the
  model's `BoundaryLoss`: (vecs, toks) -> (vecs, aux). Its sublayers, in the
  order of its weights:
    * `boundaries`: (vecs, toks) -> (vecs, ends (batch, len) 0/1[, aux]):
      `WhitespaceBoundaries` or a `BoundaryPredictor`;
    * Select, `pooling` (`SegmentPooling`: the null vector and the segment
      means), `pooling_norm` (LayerNorm): (vecs, ends) -> (short (batch, S,
      d_model), vecs, ends);
    * `middle`: the shortened layers, short -> out (batch, S, d_model);
    * Select, SegmentUpsampling, LayerNorm, Add: (out, vecs, ends) -> vecs +
      LayerNorm(out[min(closed, S-1)]).
  S = `boundaries.shortened_length(max_len, k, bound)`, with k the shorten
  factor (the target average segment length), bounds the segments pooled in
  every mode, so outputs do not depend on the input's length (eval on a
  prefix agrees with eval on the whole, and predict mode with both); the
  shortened sequence of len tokens holds min(S, len + 1) vectors, a static
  shape. In predict mode (one token per call) the shortened
  layers step only when a segment closes (and once, at the first token, on
  the null vector), per example: see `_predict_step`; the level returns vecs
  alone (no boundary loss).
  """

  def __init__(self, kind, shorten_factor, boundaries, middle,
               mode='train', bound=dynamic.SHORTENED_BOUND, max_len=2048):
    self._boundaries = boundaries
    self._pooling, self._upsampling = self._resampling(shorten_factor, bound,
                                                       max_len)
    self._pooling_norm = LayerNorm()
    self._middle = tl.Serial(middle)  # out: (batch, S, d_model), vecs, ends
    super().__init__(
        self._boundaries,
        tl.Select([0, 1, 0, 1]),  # vecs, ends, vecs, ends
        self._pooling,  # short, vecs, ends
        self._pooling_norm,  # short: (batch, S, d_model), vecs, ends
        self._middle, self._upsampling,
        name=f'{type(self).__name__}({kind}, {shorten_factor})')
    self._kind = kind
    self._shorten_factor = shorten_factor
    self._mode = mode
    self._bound = bound
    # S: the bound of every mode.
    self._max_shortened = dynamic.shortened_length(max_len, shorten_factor,
                                                   bound)

  kind = property(lambda self: self._kind)
  mode = property(lambda self: self._mode)
  max_shortened = property(lambda self: self._max_shortened)
  shorten_factor = property(lambda self: self._shorten_factor)  # The target.
  bound = property(lambda self: self._bound)
  boundaries = property(lambda self: self._boundaries)
  pooling = property(lambda self: self._pooling)
  pooling_norm = property(lambda self: self._pooling_norm)
  middle = property(lambda self: self._middle)

  @staticmethod
  def _resampling(shorten_factor, bound, max_len):
    """(pooling, upsampling): (vecs, ends) -> short; (out, vecs, ends) -> vecs."""
    return dynamic.SegmentPooling(shorten_factor, bound, max_len), (
        tl.Select([0, 2, 1]),  # out, ends, vecs
        dynamic.SegmentUpsampling(),  # up: (batch, len, d_model), vecs
        LayerNorm(),  # up, vecs
        tl.Add())  # vecs: up + vecs

  def _pooling_state(self, batch, d_model, dtype):
    """Predict mode's segment clock (see `_init_predict`)."""
    zeros = jnp.zeros((batch, d_model), dtype)
    count = jnp.zeros((batch,), jnp.int32)
    return zeros, count, count, zeros

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      return self._init_predict(input_signature)
    return super().init_weights_and_state(input_signature)

  def forward(self, xs):
    if self._mode == 'predict':
      return self._predict_step(xs)
    return super().forward(xs)

  def _init_predict(self, input_signature):
    """Predict-mode weights and state.

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
    weights, states, stack = [], [], input_signature
    for layer in self.sublayers:
      inputs = inputs_from_stack(stack, layer.n_in)
      if layer is self._middle:
        w, s = layer.init(shapes.ShapeDtype((1, 1, d_model), vecs.dtype),
                          use_cache=True)
        s = jax.tree_util.tree_map(lambda x: jnp.stack([x] * batch), s)
        outputs = one_vec
      else:
        w, s = layer.init(inputs, use_cache=True)
        outputs, _ = layer._forward_abstract(inputs)  # pylint: disable=protected-access
      if layer is self._pooling:  # One shortened vector at a time.
        s, outputs = self._pooling_state(batch, d_model, vecs.dtype), one_vec
      stack = outputs_onto_stack(outputs, stack, layer.n_in)
      weights.append(w)
      states.append(s)
    self.state = tuple(states)
    self.weights = tuple(weights)

  def _predict_step(self, xs):
    """One token through the level in predict mode.

    xs: (vecs (batch, 1, d_model), toks (batch, 1), ...) -> (vecs, ...).
    The boundaries run on the token; its vector joins the open segment of its
    example (see `_init_predict` for the state). The shortened layers step,
    one example at a time under `lax.while_loop`, only for the examples that
    need a new shortened position: at the first token (the null vector), and
    when the token closes a segment (its mean), while fewer than S-1 segments
    are pooled (eval mode's bound; later positions keep the last output).
    Every token then takes its example's latest shortened output through the
    upsampling, as eval mode's out[min(closed, S-1)].
    """
    index, _, run = _sublayer_runner(self)
    state = list(self.state)
    stack = run([self._boundaries], xs, state)  # vecs, ends (b, 1)[, aux], ...
    vecs, ends = stack[:2]
    rest = stack[3:] if self._kind in dynamic.LEARNED else stack[2:]  # No loss.
    i_pooling = index[id(self._pooling)]
    total, count, closed, latest = state[i_pooling]
    batch, _, d_model = vecs.shape
    ends = ends[:, 0] > 0.5  # (batch,)
    first = (count == 0) & (closed == 0)
    total = total + vecs[:, 0].astype(total.dtype)
    count = count + 1
    mean = total / (count[:, None].astype(total.dtype) + 1e-9)
    null = jnp.broadcast_to(self.weights[i_pooling], (batch, d_model))
    # Work items: every example's null vector, then every example's new mean.
    short = run([self._pooling_norm], jnp.concatenate([null, mean])[:, None],
                state)[:, 0]
    todo = jnp.concatenate([first, ends & (closed < self._max_shortened - 1)])
    latest = self._step_middle(short, todo, state, latest)
    keep = ~ends[:, None]
    state[i_pooling] = (jnp.where(keep, total, 0), jnp.where(ends, 0, count),
                        closed + ends.astype(closed.dtype), latest)
    # A one-vector shortened sequence: upsampling takes it for the token.
    stack = run(self._upsampling, (latest[:, None], vecs, stack[1]) +
                tuple(rest), state)
    self.state = tuple(state)
    return stack

  def _step_middle(self, items, todo, state, latest):
    """Steps the shortened layers on the work items to do, in order.

    items: (n, d_model), item i of example i % batch; todo: (n,) bool. Each
    example's caches (`state`'s middle entry, per example, updated in place)
    step once per item to do, one example at a time under `lax.while_loop`.
    Returns latest (batch, d_model) with each stepped example's last output.
    """
    index, rngs, _ = _sublayer_runner(self)
    i_middle = index[id(self._middle)]
    batch = latest.shape[0]
    order = jnp.argsort(~todo, stable=True)  # Items to do first, in order.
    middle = self._middle

    def body(carry):
      i, middle_state, latest = carry
      item = order[i]
      example = item % batch
      one = jax.tree_util.tree_map(lambda x: x[example], middle_state)
      out, new = middle.pure_fn(items[item][None, None], self.weights[i_middle],
                                one, rngs[i_middle], use_cache=True)
      middle_state = jax.tree_util.tree_map(
          lambda x, v: x.at[example].set(v), middle_state,
          in_structure_of(one, new))
      return i + 1, middle_state, latest.at[example].set(out[0, 0])

    _, state[i_middle], latest = control_flow.while_loop(
        lambda carry: carry[0] < jnp.sum(todo), body,
        (jnp.zeros((), jnp.int32), state[i_middle], latest))
    return latest


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
