"""Weights laid out for decoding, derived once per sampling call, not per step.

A predict-mode layer may read some weight faster in another layout than the one
trax saves (`model.weights` keep trax's, so checkpoints do not change). Such a
layer has a method `laid_out_for_decoding(weights)` returning its weights for
decoding, which `decoding_weights` hands it as a `DecodingLayout`: in its
forward pass it tells the two apart by that type and, given trax's (as
trax's own `autoregressive_sample` passes them), derives the layout per call.
"""

import jax


class DecodingLayout(tuple):
  """A layer's weights in its decoding layout (a pytree, like a tuple)."""


jax.tree_util.register_pytree_node(
    DecodingLayout, lambda weights: (tuple(weights), None),
    lambda _, weights: DecodingLayout(weights))


def decoding_weights(model):
  """`model.weights` with each predict-mode layer's laid out for decoding.

  Each layer's derived weights are kept on it while its weights are the same
  objects: sampling again with the same weights copies nothing.
  """
  def walk(layer, weights):
    lay_out = getattr(layer, 'laid_out_for_decoding', None)
    if lay_out is not None and getattr(layer, '_mode', None) == 'predict':
      kept = getattr(layer, '_decoding_weights', None)
      if kept is None or len(kept[0]) != len(weights) or any(
          a is not b for a, b in zip(kept[0], weights)):
        kept = layer._decoding_weights = (  # pylint: disable=protected-access
            tuple(weights), DecodingLayout(lay_out(weights)))
      return kept[1]
    if not layer.sublayers or isinstance(weights, dict):  # dict: shared.
      return weights
    return tuple(walk(*pair) for pair in zip(layer.sublayers, weights))
  return walk(model, model.weights)
