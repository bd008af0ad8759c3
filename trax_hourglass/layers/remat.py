"""Rematerialisation: a layer whose activations are recomputed in the backward pass.

`HourglassLM(remat='blocks')` wraps each half of each decoder block (the
attention and the feed-forward residuals) in `Rematerialized`: the backward
pass keeps only each half's input (batch, len, d_model) and recomputes the
rest (queries, keys, values, scores, the d_ff-wide hidden layer) from it, for
about one more forward pass of compute (`jax.checkpoint` with the policy
`nothing_saveable`, MaxText's remat_policy='full'). Saving the matrix products
(`dots_with_no_batch_dims_saveable`) would keep ~9 vectors of d_model per
position and layer (q, k, v, the attention output, the 4x-wide hidden layer):
most of what rematerialising is for.
"""

import jax
import trax.layers as tl


class Rematerialized(tl.Serial):
  """`layer`, a `tl.Serial`, recomputed in the backward pass.

  Same sublayers, so the same weights tree, state and outputs (the same rng:
  dropout draws the same masks when recomputing): checkpoints load into a
  model built with or without it.
  """

  def __init__(self, layer, policy=jax.checkpoint_policies.nothing_saveable):
    if type(layer) is not tl.Serial:  # pylint: disable=unidiomatic-typecheck
      raise TypeError(f'Rematerialized takes a tl.Serial, got {layer}.')
    super().__init__(layer.sublayers, name=layer.name)
    self._policy = policy

  def forward(self, xs):
    # Weights shared with other layers arrive as trax's cache markers and are
    # read from those layers; the first occurrence of a shared layer caches
    # its weights in it, so they are set back to ours (outside the checkpoint,
    # no tracer of it) once it has run.
    weights, state, rng = self.weights, self.state, self.rng

    def run(xs, weights, state, rng):
      self.weights, self.state, self._rng = weights, state, rng
      return super(Rematerialized, self).forward(xs), self.state

    outputs, self.state = jax.checkpoint(run, policy=self._policy)(
        xs, weights, state, rng)
    self.weights, self._rng = weights, rng
    return outputs
