"""Loaders of a model's weights from a checkpoint, read safely and checked.

`init_from_file` is trax's `Layer.init_from_file` reading through `reader`
(nothing unpickled with a plain unpickler), refusing a checkpoint whose
weights do not fit the model one to one; `load_trax_hourglass_weights` fills
our `HourglassLM` from the original trax model's weights.
"""

import os

import numpy as np
from trax import fastmath
from trax import layers as tl
from trax import shapes
from trax.layers import base

from trax_hourglass.checkpoints.format import CheckpointError
from trax_hourglass.checkpoints.format import check_shapes
from trax_hourglass.checkpoints.format import from_bits
from trax_hourglass.checkpoints.reader import Checkpoint
from trax_hourglass.checkpoints.reader import read_checkpoint_at


def init_from_file(layer, file_name, weights_only=False, input_signature=None):
  """`Layer.init_from_file` (trax's model loader), reading safely.

  `file_name`: a `*.pkl.gz` checkpoint, an output dir (its committed `model`
  checkpoint, `store.checkpoint_location`), or a `Checkpoint` already read.
  Returns `(weights, state)`, as trax's.
  """
  ckpt = (file_name if isinstance(file_name, Checkpoint) else
          read_checkpoint_at(file_name))
  d = ckpt.data
  if input_signature is None:
    input_signature = d['input_signature']
  if weights_only and input_signature is not None:
    layer.init(input_signature)
  sig = layer.weights_and_state_signature(input_signature)
  check_fits(layer, sig[0], ckpt)
  weights, state = tl.unflatten_weights_and_state(
      from_bits(ckpt.flat_weights), from_bits(d.get('flat_state', ())), sig,
      weights_only=weights_only)
  if not weights_only:
    layer.state = state
  layer.weights = weights
  return (layer.weights, layer.state)


def check_fits(layer, weights_signature, ckpt):
  """Raises CheckpointError unless `ckpt`'s weights fit `layer` one to one.

  trax's loader fills a model with whatever arrays it is given, so a model
  built from another config (another d_model: the checkpoint's own shapes
  win, and its numbers are reported; another layer count: a traceback deep
  in trax) must be refused here, naming what differs.
  """
  where = f'{ckpt.path} (step {ckpt.step})'
  fix = ("the config does not match the checkpoint; use the run's own "
         'config (drop --config bindings that change the model).')
  expected = _flat_weights(weights_signature)
  saved = ckpt.flat_weights
  if len(expected) != len(saved):
    raise CheckpointError(
        f'{where} holds {len(saved)} weight arrays, the model built from the '
        f'config has {len(expected)} (another number or kind of layers): '
        f'{fix}')
  names = _weight_names(layer, weights_signature)
  for i, (want, got) in enumerate(zip(expected, saved)):
    if tuple(want.shape) != tuple(got.shape):
      name = f' ({names[i]})' if len(names) == len(expected) else ''
      raise CheckpointError(
          f'weight array {i}{name} of {where} has shape {tuple(got.shape)}, '
          f'the model built from the config expects {tuple(want.shape)}: '
          f'{fix}')


def _weight_names(layer, weights):
  """The name of the innermost layer holding each of _flat_weights(weights)."""
  if not fastmath.tree_flatten(weights) or (
      isinstance(weights, dict) and weights == base.GET_WEIGHTS_FROM_CACHE):
    return []
  if (layer.sublayers and isinstance(weights, (tuple, list)) and
      len(weights) == len(layer.sublayers)):
    return [name for sublayer, w in zip(layer.sublayers, weights)
            for name in _weight_names(sublayer, w)]
  return [layer.name] * len(_flat_weights(weights))


def _flat_weights(weights):
  """trax's flat weight list: shared weights once, empty layers skipped."""
  return base.flatten_weights_and_state(weights, ())[0]


def load_trax_hourglass_weights(model, weights_or_checkpoint_path):
  """Loads the weights of a trax `HourglassLM` into `model` and returns it.

  Ours lays its weights out leaf for leaf as trax's (the same layers in the
  same order, the shared relative-attention biases once), so the original's
  flat weights fill ours; every shape is checked (CheckpointError names the
  first mismatch).

  Args:
    model: our `HourglassLM`, built with the original's arguments (any mode);
      initialised here if it is not yet.
    weights_or_checkpoint_path: the original's weights (nested or flat), or a
      checkpoint of trax's Loop or Trainer (its `model.pkl.gz`, e.g. the
      released ImageNet checkpoints, or its output dir).
  """
  source = weights_or_checkpoint_path
  if isinstance(source, (str, os.PathLike)):
    flat, where = read_checkpoint_at(source).flat_weights, os.fspath(source)
  else:
    flat, where = _flat_weights(source), 'the given weights'
  flat = [np.asarray(w) for w in from_bits(flat)]
  if not _flat_weights(model.weights):
    model.init(shapes.ShapeDtype((1, 1), np.int32))
  target = _flat_weights(model.weights)
  check_shapes(where, target, flat, 'weight',
               'build the model with the same arguments as the original '
               '(hierarchy, vanilla_layers, d_model, d_ff, n_heads, '
               'vocab_size, resampling and attention types).')
  cast = [np.asarray(w, dtype=t.dtype) for w, t in zip(flat, target)]
  model.weights, _ = fastmath.tree_unflatten(
      cast, model.weights,
      copy_from_tree=[base.EMPTY_WEIGHTS, base.GET_WEIGHTS_FROM_CACHE])
  return model
