"""`RouterLevel`: a dynamic level chunked by H-Net's router (`layers.router`)."""

import trax.layers as tl
from trax.fastmath import numpy as jnp

from trax_hourglass.layers import boundaries as dynamic
from trax_hourglass.layers import router
from trax_hourglass.layers.precision import LayerNorm
from trax_hourglass.models.levels import DynamicLevel
from trax_hourglass.models.levels import _sublayer_runner  # pylint: disable=protected-access


class RouterLevel(DynamicLevel):
  """(vecs, toks) -> (vecs + confidence * LayerNorm(dechunk(middle(chunks))),
  aux): H-Net's dynamic chunking as one hourglass level.

  vecs (batch, len, d_model), toks (batch, len) the level's input tokens
  (unused by the router). Its sublayers, in the order of its weights:
    * `boundaries`: `RouterBoundaries`, (vecs, toks) -> (vecs, p (batch, len),
      aux = p): a chunk starts where p > 0.5;
    * Select, `pooling` (`ChunkSelection`: each chunk's first vector),
      `pooling_norm` (LayerNorm): (vecs, p) -> (short (batch, S', d_model),
      vecs, p);
    * `middle`: the shortened layers, short -> out (batch, S', d_model);
    * Select, `ChunkUpsampling` (H-Net's EMA over chunks), LayerNorm,
      `Confidence` (straight-through: 1 forward; after the norm, which would
      cancel its gradient), Add: (out, vecs, p) -> vecs + up.
  S' = min(S, len), S = `boundaries.shortened_length(max_len, k, bound)`: at
  most S chunks are pooled (later ones read chunk S-1's output), in every
  mode. aux feeds the model's `BoundaryLoss` (H-Net's ratio loss toward 1/k
  chunk starts). Predict mode: as `DynamicLevel`'s, the shortened layers step
  once per chunk started, for the rows that start one (see `_predict_step`).
  """

  def __init__(self, shorten_factor, middle, mode='train',
               bound=dynamic.SHORTENED_BOUND, max_len=2048):
    super().__init__('router', shorten_factor, router.RouterBoundaries(mode),
                     middle, mode=mode, bound=bound, max_len=max_len)

  @staticmethod
  def _resampling(shorten_factor, bound, max_len):
    """(pooling, upsampling): (vecs, p) -> short; (out, vecs, p) -> vecs."""
    return router.ChunkSelection(shorten_factor, bound, max_len), (
        tl.Select([0, 2, 2, 1]),  # out, p, p, vecs
        router.ChunkUpsampling(),  # up: (batch, len, d_model), p, vecs
        LayerNorm(),  # up, p, vecs
        router.Confidence(),  # up, vecs
        tl.Add())  # vecs: up + vecs

  def _pooling_state(self, batch, d_model, dtype):
    """Per row: the chunks started (batch,), the shortened layers' latest
    output and the EMA z (batch, d_model) each."""
    zeros = jnp.zeros((batch, d_model), dtype)
    return jnp.zeros((batch,), jnp.int32), zeros, zeros

  def _predict_step(self, xs):
    """One token through the level in predict mode.

    xs: (vecs (batch, 1, d_model), toks (batch, 1), ...) -> (vecs, ...). A
    row whose token starts a chunk (p > 0.5) while fewer than S chunks are
    pooled feeds its normed vector to the shortened layers (its own caches)
    and folds their output into its z, `ema_step`; every row then takes its
    z through LayerNorm, confidence and the add, as eval mode's z[min(chunk,
    S-1)]. No loss in predict mode.
    """
    index, _, run = _sublayer_runner(self)
    state = list(self.state)
    stack = run([self._boundaries], xs, state)  # vecs, p (batch, 1), aux, ...
    vecs, p, rest = stack[0], stack[1], stack[3:]
    i_pooling = index[id(self._pooling)]
    chunks, latest, z = state[i_pooling]
    todo = (p[:, 0] > 0.5) & (chunks < self._max_shortened)  # (batch,)
    short = run([self._pooling_norm], vecs, state)[:, 0]  # (batch, d_model)
    latest = self._step_middle(short, todo, state, latest)
    z = jnp.where(todo[:, None], router.ema_step(z, latest, p[:, 0]), z)
    state[i_pooling] = (chunks + todo.astype(chunks.dtype), latest, z)
    stack = run(self._upsampling[2:], (z[:, None], p, vecs) + tuple(rest),
                state)  # LayerNorm, Confidence, Add.
    self.state = tuple(state)
    return stack
