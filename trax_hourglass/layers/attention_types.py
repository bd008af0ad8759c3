"""The attention-type adapter: any attention class of trax or ours, as vecs -> vecs.

HourglassLM takes its attentions as types (`vanilla_attn_type`,
`middle_attn_type`), as trax's HourglassLM does: our `RelativeAttentionWrapper`,
`RotaryCausalAttention`, or a trax attention class, a `functools.partial` of one
or a gin reference to one. `SelfAttention` builds each with the arguments its
constructor takes; `has_positions` tells whether the model must add absolute
positions for it.
"""

import functools
import inspect

import gin
import trax.layers as tl

from trax_hourglass.layers import favor


def unwrap_partial(fn):
  """(function, keywords) of `fn` through nested `functools.partial`s.

  The outermost partial's keywords win, as when calling it.
  """
  keywords = {}
  while isinstance(fn, functools.partial):
    keywords = {**fn.keywords, **keywords}
    fn = fn.func
  return fn, keywords


def constructor_parameters(attention_type):
  """Parameter names of a layer class or function, seen through partials and gin."""
  fn, _ = unwrap_partial(attention_type)
  if inspect.isclass(fn):  # gin-wrapped classes hide their signature; __init__ does not.
    fn = fn.__init__
  try:
    return inspect.signature(inspect.unwrap(fn)).parameters
  except (TypeError, ValueError):
    return {}


def _with_predict_mode(attention_type):
  """trax's `tl.CausalFavor` ignores predict mode: use ours, same weights."""
  fn, keywords = unwrap_partial(attention_type)
  if inspect.unwrap(fn) is inspect.unwrap(tl.CausalFavor):
    return functools.partial(favor.CausalFavor, **keywords)
  return attention_type


def has_positions(attention_type):
  """Whether an attention type encodes positions itself.

  Ours do (relative and rotary: they take `total_pooling`), and so do trax's
  LSH wrappers with `rotary_position_emb=True` (given in a partial or a gin
  binding). Without positions (`tl.CausalAttention`, `tl.CausalFavor`, sparse
  QKV, plain LSH) HourglassLM adds absolute positions at the embedding.
  """
  params = constructor_parameters(attention_type)
  if 'context_bias_layer' in params or 'total_pooling' in params:
    return True
  fn, keywords = unwrap_partial(attention_type)
  for selector in (fn, getattr(fn, '__name__', None)):
    if 'rotary_position_emb' in keywords or selector is None:
      break
    try:  # Gin bindings of the configurable (by name for external classes).
      keywords = gin.get_bindings(selector)
    except (ValueError, TypeError, KeyError):  # Not in the gin registry.
      pass
  return bool(keywords.get('rotary_position_emb', False))


def SelfAttention(attention_type, d_model, n_heads, dropout, mode,
                  context_bias_layer, location_bias_layer, total_pooling,
                  max_inference_length=2048):
  """The attention adapter: builds any attention type as vecs -> vecs.

  `attention_type` is our `RelativeAttentionWrapper` or a trax attention class
  (`tl.CausalAttention`, `tl.LSHSelfAttention`, `tl.CausalFavor`,
  `MultiplicativeConvCausalAttention`, ...), a `functools.partial` of one, or a
  gin reference to one. Their constructors differ; this reads the signature and
  passes each what it takes, exactly as trax's HourglassLM does, so the weights
  have the same layout. `max_inference_length` (the level's longest sequence in
  predict mode) and `total_pooling` go to those that take them.
  """
  attention_type = _with_predict_mode(attention_type)
  params = constructor_parameters(attention_type)
  extra = {}
  if 'max_inference_length' in params:
    extra['max_inference_length'] = max_inference_length
  if 'total_pooling' in params:
    extra['total_pooling'] = total_pooling
  if 'context_bias_layer' in params:
    return attention_type(
        d_model, n_heads=n_heads, dropout=dropout, mode=mode,
        context_bias_layer=context_bias_layer,
        location_bias_layer=location_bias_layer, **extra)
  if 'd_qk' in params:  # Reformer-style layers (LSH, PureLSH, ...).
    d_head = d_model // n_heads
    if 'predict_mem_len' in params:  # Remember the whole level, drop none.
      extra['predict_mem_len'] = extra['predict_drop_len'] = (
          max_inference_length)
    return attention_type(
        n_heads=n_heads, d_qk=d_head, d_v=d_head, causal=True, masked=False,
        output_dropout=dropout, attention_dropout=dropout, mode=mode, **extra)
  return attention_type(d_model, n_heads=n_heads, dropout=dropout, mode=mode,
                        **extra)
