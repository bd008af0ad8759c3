"""Loading the weights of trax's original HourglassLM into ours.

Our `HourglassLM` lays its weights out leaf for leaf as trax's does (same layers
in the same order, the two shared relative-attention biases stored once), so a
flat list of the original's weights fills ours directly; the loader checks every
shape and says where a configuration differs.
"""

import os

import numpy as np
from trax import fastmath
from trax import shapes
from trax.layers import base

from trax_hourglass import checkpoints


def _flat_weights(weights):
  """trax's flat weight list: shared weights once, empty layers skipped."""
  return base.flatten_weights_and_state(weights, ())[0]


def read_trax_checkpoint_weights(path):
  """Flat weights of a checkpoint written by trax's training loop or Trainer.

  Args:
    path: `model.pkl.gz` (or a directory holding it). Its weights are in the
      pickle ('flat_weights' list, older format) or in `model.weights.npy.gz`
      beside it (current format).

  Returns:
    A list of numpy arrays in trax's flattening order.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, 'model.pkl.gz')
  checkpoint = checkpoints.safe_unpickle(path)  # Never runs code from it.
  if not isinstance(checkpoint, dict) or 'flat_weights' not in checkpoint:
    raise ValueError(f'{path} is not a trax checkpoint: it has no flat_weights.')
  flat = checkpoint['flat_weights']
  if isinstance(flat, int):  # Current format: weights in a separate file.
    stem = path[:-len('pkl.gz')] if path.endswith('.pkl.gz') else path + '.'
    flat = checkpoints.read_arrays(stem + 'weights.npy.gz')
  return [np.asarray(w) for w in checkpoints.from_bits(flat)]


def load_trax_hourglass_weights(model, weights_or_checkpoint_path):
  """Loads the weights of a trax `HourglassLM` into `model` and returns it.

  Args:
    model: our `HourglassLM`, built with the same arguments as the original
      (any mode). Initialised here if it is not yet.
    weights_or_checkpoint_path: the original's weights (`model.weights`, a
      nested tuple, or a flat list of arrays), or the path of a `model.pkl.gz`
      checkpoint written by trax (e.g. the released ImageNet checkpoints).

  Returns:
    `model`, with the original's weights.

  Raises:
    ValueError: if the weights do not fit `model`, naming the first mismatch.
  """
  source = weights_or_checkpoint_path
  if isinstance(source, (str, os.PathLike)):
    flat = read_trax_checkpoint_weights(source)
    where = os.fspath(source)
  else:
    flat = [np.asarray(w) for w in _flat_weights(source)]
    where = 'the given weights'
  if not _flat_weights(model.weights):
    model.init(shapes.ShapeDtype((1, 1), np.int32))
  target = _flat_weights(model.weights)
  if len(flat) != len(target):
    raise ValueError(
        f'{where} holds {len(flat)} weight arrays but the model has '
        f'{len(target)}: build the model with the same arguments as the '
        'original (hierarchy, vanilla_layers, resampling and attention types).')
  for i, (w, t) in enumerate(zip(flat, target)):
    if w.shape != t.shape:
      raise ValueError(
          f'Weight array {i} of {where} has shape {w.shape} but the model '
          f'expects {t.shape}: build the model with the same d_model, d_ff, '
          'n_heads, vocab_size and hierarchy as the original.')
  cast = [np.asarray(w, dtype=t.dtype) for w, t in zip(flat, target)]
  weights, _ = fastmath.tree_unflatten(
      cast, model.weights,
      copy_from_tree=[base.EMPTY_WEIGHTS, base.GET_WEIGHTS_FROM_CACHE])
  model.weights = weights
  return model
