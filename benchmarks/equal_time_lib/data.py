"""equal_time.py's data: a byte file's splits, or an .npz of images.

Workers read training batches and the validation and test batches to score
(`text_data`, `image_data`); the parent checks the images' shape
(`image_length`).
"""

import math

import harness


def is_images(cfg):
  return cfg['data'].endswith('.npz')


def load_images(path):
  """(train_images, test_images) of an .npz, each uint8 [N, H, W, C]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path, allow_pickle=False) as f:  # Nothing read runs code.
    return f['train_images'], f['test_images']


def valid_images(n_train):
  """How many of the last train_images validate (5%, as the text splits)."""
  return max(1, n_train // 20)


def text_data(cfg, record):
  """(training stream, validation batches, test batches) of a byte file."""
  from trax_hourglass.data import text  # pylint: disable=g-import-not-at-top

  # Data: the byte-file pipeline's splits and training batches.
  data = text.load_bytes(cfg['data'])
  bounds = text.byte_file_splits(len(data))
  inputs = text.byte_file_inputs(
      cfg['data'], batch_size=cfg['batch'], sequence_length=cfg['seq_len'],
      seed=harness.SEED)

  def windows(split, n_batches):
    """Batches of consecutive windows of `split` (0: every whole window)."""
    part = data[slice(*bounds[split])]
    n_windows = len(part) // cfg['seq_len']
    n_batches = n_batches or max(1, n_windows // cfg['batch'])
    batch = text.eval_batches(part, cfg['batch'], cfg['seq_len'])
    record[f'{split}_bytes'] = len(part)
    record[f'{split}_scored_bytes'] = n_batches * cfg['batch'] * cfg['seq_len']
    record[f'{split}_wraps'] = n_batches * cfg['batch'] > n_windows
    return [batch(i)[0] for i in range(n_batches)]

  valid_batches = windows('valid', cfg['eval_batches'])
  test_batches = windows('test', cfg['test_batches'])
  record.update(data_bytes=len(data), train_bytes=bounds['train'][1])
  return inputs.train_stream(1), valid_batches, test_batches


def image_data(cfg, record):
  """The same of an .npz of images: the last 5% of its train_images validate."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trax_hourglass.data import images  # pylint: disable=g-import-not-at-top
  train, test = load_images(cfg['data'])
  n_valid = valid_images(len(train))
  train, valid = train[:-n_valid], train[-n_valid:]
  inputs = images.array_image_inputs(train, valid, 'equal_time',
                                     cfg['batch'], seed=harness.SEED)

  def batches(split, part, n_batches):
    """Batches of consecutive images of `part` (0: every whole batch)."""
    n_batches = n_batches or max(1, len(part) // cfg['batch'])
    flat = images.flatten_images(part)
    idx = np.arange(n_batches * cfg['batch']) % len(flat)  # Wraps if short.
    record[f'{split}_images'] = len(part)
    record[f'{split}_scored_images'] = len(idx)
    return list(flat[idx].reshape(n_batches, cfg['batch'], -1))

  record.update(train_images=len(train), image_shape=list(train.shape[1:]))
  return (inputs.train_stream(1), batches('valid', valid, cfg['eval_batches']),
          batches('test', test, cfg['test_batches']))


def image_length(args, cfg):
  """H * W * C of the images of --data (an .npz), or SystemExit."""
  try:
    train, test = load_images(cfg['data'])
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f'--data {args.data}: not an .npz with train_images and '
                     f'test_images ({type(e).__name__}: {e}).') from None
  if (train.dtype != 'uint8' or train.ndim != 4 or
      test.shape[1:] != train.shape[1:] or len(train) < 2 or not len(test)):
    raise SystemExit(f'--data {args.data}: train_images {train.dtype} '
                     f'{train.shape} and test_images {test.dtype} {test.shape}'
                     ' must be uint8 [N, H, W, C] of one shape (N >= 2).')
  length = math.prod(train.shape[1:])
  if args.seq_len not in (None, length):
    raise SystemExit(f'--seq_len {args.seq_len}: the images of --data are '
                     f'{length} tokens ({"x".join(map(str, train.shape[1:]))})'
                     '; leave --seq_len out.')
  return length

