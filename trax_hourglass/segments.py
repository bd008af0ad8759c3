"""Where a dynamic-pooling model ends its segments: `segment_boundaries`."""

import numpy as np

from trax_hourglass.models.hourglass import DynamicLevel


def segment_boundaries(model, tokens):
  """The segment ends an eval-mode dynamic-pooling model uses on `tokens`.

  Runs the model once and reads its shortened level's boundaries as the
  level computes them (whitespace, the predictor's sigmoid > 0.5, or the
  router's chunk starts, p > 0.5, each read as an end after the position
  before).

  Args:
    model: an `HourglassLM(..., boundaries=..., mode='eval')` with its weights
      (boundaries other than 'fixed').
    tokens: ints (batch, len).

  Returns:
    bool numpy (batch, len): ends[:, t] is True when a segment ends after
    position t. Position t holds token t-1 (the model's input shift; position
    0 holds 0), so ends[:, t] says token t-1 closes a segment and token t
    starts the next. The average shortening achieved is len / (number of
    ends + 1).

  Raises:
    ValueError: the model has no dynamic level or is not in eval mode.
  """
  levels = [layer for layer in model.sublayers
            if isinstance(layer, DynamicLevel)]
  if not levels:
    raise ValueError(
        "segment_boundaries needs an HourglassLM with dynamic boundaries "
        "(boundaries='whitespace', 'entropy', 'gumbel', 'unigram' or "
        "'router'); this model pools every k tokens.")
  level = levels[0]
  if level.mode != 'eval':  # Train: Gumbel noise and dropout.
    raise ValueError(
        f"segment_boundaries needs an eval-mode model, got mode="
        f"{level.mode!r}: build HourglassLM(..., mode='eval') and give it the "
        'trained weights.')
  part, recorded = level.boundaries, []
  forward = part.forward

  def recording_forward(inputs):
    outputs = forward(inputs)
    recorded.append(np.asarray(outputs[1]))  # (vecs, ends[, aux])
    return outputs

  object.__setattr__(part, 'forward', recording_forward)  # Past trax's guard.
  try:
    tokens = np.asarray(tokens)
    model(tokens)
  finally:
    object.__delattr__(part, 'forward')
  marks = recorded[-1][:, :tokens.shape[1]] > 0.5
  if level.kind == 'router':  # Chunk starts: a segment ends just before each.
    marks = np.pad(marks[:, 1:], ((0, 0), (0, 1)))
  return marks
