"""What the layers attend to: the softmax weights of every attention layer.

`attention_maps(model, tokens)` runs an eval-mode `HourglassLM` once on tokens
and reads each attention layer's weights as the layer computes them (its own
`attention_weights`, on the inputs it receives in that run): same weights,
same relative positions, nothing recomputed beside the model.

Supported: our relative attention (`RelativeAttentionWrapper`, HourglassLM's
default `vanilla_attn_type` / `middle_attn_type`, and the attention inside
`AttentionResampling`). Other attention types (rotary, trax's
`tl.CausalAttention`, LSH, Favor, ...) are refused with a ValueError.
"""

import collections

import numpy as np

from trax_hourglass.layers.attention import RelativeDotProductAttention
from trax_hourglass.models.levels import DynamicLevel
from trax_hourglass.models.levels import ShortenedLevel

AttentionMap = collections.namedtuple(
    'AttentionMap', ['name', 'kind', 'shorten_factor', 'weights'])
AttentionMap.__doc__ = """One attention layer's weights over one input.

name: its place, e.g. 'pre/0', 'level1/shortening', 'level1/shortened/3',
  'level2/shortened/0', 'level1/upsampling', 'post/1' (levels count from the
  outermost, 1; layers of a level are numbered in data-flow order, those
  after a nested level continuing the count).
kind: 'full', 'shortening', 'shortened' or 'upsampling'.
shorten_factor: the total shortening of the layer's level relative to the
  tokens, the k of 'n@k' in the hierarchy (1 for 'full'). For 'shortening'
  the queries are at this factor and the keys at the level outside; for
  'upsampling' the keys are at this factor and the queries outside. A
  dynamic-pooling level (`boundaries` other than 'fixed') has 'shortened'
  layers only, over its S segments (the null vector first); k is then the
  target segment length.
weights: float32 numpy (batch, heads, queries, keys), each row summing to 1,
  exactly 0 on the keys the query may not see.
"""


def attention_maps(model, tokens):
  """Returns an `AttentionMap` per attention layer, in the order data flows.

  Args:
    model: an `HourglassLM(..., mode='eval')` with its weights (e.g. a
      trained model's, loaded into an eval-mode one).
    tokens: ints (batch, len). The maps are at the lengths the model runs
      at: len rounded up to a multiple of the total shorten factor (the model
      pads after the tokens), over that factor at a shortened level. Full-length
      position t has read tokens < t (the model's input shift). A level
      shortening by k shifts its input right by k-1, so shortened position i
      covers positions k*i-k+1 .. k*i of the level outside, and the
      shortening's keys are those shifted positions (key t is position
      t-k+1; the first k-1 keys are the shift's zeros).

  Returns:
    A list of `AttentionMap`: the full-length layers before the shortening,
    the shortening's attention (attention pooling only), the shortened
    layers (nested levels in their place), the upsampling's attention
    (attention upsampling only), the full-length layers after.

  Raises:
    ValueError: the model is not in eval mode, or has an attention type
      other than our relative attention.
  """
  labels = _labels(model)
  calls = []
  layers = [layer for layer in _walk(model)
            if isinstance(layer, RelativeDotProductAttention)]
  for layer in layers:
    _record(layer, calls)
  try:
    model(np.asarray(tokens))
  finally:
    for layer in layers:
      # The class's, again.
      for method in ('forward', 'attention_weights', 'dense_only'):
        object.__delattr__(layer, method)
  return [AttentionMap(*labels[id(layer)], _assemble(blocks))
          for layer, blocks in calls]


def _walk(layer):
  yield layer
  for sublayer in layer.sublayers:
    yield from _walk(sublayer)


def _labels(model):
  """{id(attention layer): (name, kind, shorten_factor)}, or raises."""
  labels, counts = {}, collections.Counter()

  def visit(layer, place, kind, factor, depth):
    if isinstance(layer, DynamicLevel):  # Segment means: no attention.
      visit(layer.middle, f'level{depth + 1}/shortened', 'shortened',
            factor * layer.shorten_factor, depth + 1)
      return 'post' if depth == 0 else place
    if isinstance(layer, ShortenedLevel):
      level, total = depth + 1, factor * layer.shorten_factor
      visit(layer.pooling, f'level{level}/shortening', 'shortening', total,
            level)
      visit(layer.middle, f'level{level}/shortened', 'shortened', total, level)
      visit(layer.upsampling, f'level{level}/upsampling', 'upsampling', total,
            level)
      return 'post' if depth == 0 else place  # Full-length layers after it.
    if isinstance(layer, RelativeDotProductAttention):
      if getattr(layer, '_mode') != 'eval':  # Train: dropout; predict: caches.
        raise ValueError(
            f"attention_maps needs an eval-mode model, got mode="
            f"{getattr(layer, '_mode')!r}: build HourglassLM(..., mode='eval') "
            'and give it the trained weights.')
      numbered = kind in ('full', 'shortened')
      name = f'{place}/{counts[place]}' if numbered else place
      counts[place] += 1
      labels[id(layer)] = (name, kind, factor)
    elif type(layer).__name__.endswith('Attention'):
      raise ValueError(
          f'attention_maps reads our relative attention only '
          f'(RelativeAttentionWrapper, the default); this model has '
          f'{type(layer).__name__} in {place}.')
    for sublayer in layer.sublayers:
      place = visit(sublayer, place, kind, factor, depth) or place
    return None

  visit(model, 'pre', 'full', 1, 0)
  return labels


def _record(layer, calls):
  """Makes `layer` add (layer, [weights per query block]) to calls per run."""
  forward, attention_weights = layer.forward, layer.attention_weights

  def recording_forward(inputs):
    calls.append((layer, []))
    return forward(inputs)

  def recording_weights(*args):
    weights = attention_weights(*args)
    calls[-1][1].append(np.asarray(weights))
    return weights

  # Instance attributes, past trax's guard on public ones; removed after.
  object.__setattr__(layer, 'forward', recording_forward)
  object.__setattr__(layer, 'attention_weights', recording_weights)
  # At any length, the dense pass: the blockwise one forms no weights.
  object.__setattr__(layer, 'dense_only', True)


def _assemble(blocks):
  """Query blocks (b, h, C, K_i), keys past K_i unseen -> (b, h, queries, K)."""
  n_keys = max(block.shape[-1] for block in blocks)
  return np.concatenate([
      np.pad(block, [(0, 0)] * 3 + [(0, n_keys - block.shape[-1])])
      for block in blocks], axis=2)
