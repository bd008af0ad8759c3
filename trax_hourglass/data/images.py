"""Image data for autoregressive pixel models: CIFAR-10, downsampled ImageNet.

An image [H, W, 3] of uint8 becomes H*W*3 tokens in raster order with the RGB
channels interleaved (pixel (0,0) R, G, B, then pixel (0,1) ...), as trax's
`downsampled_imagenet_flatten_bare_preprocess`: 3072 tokens for 32x32 images,
12288 for 64x64, each 0..255 (vocab_size 256). Batches are `(x, x, ones)`.

Sources: TFDS (`cifar10`, `downsampled_imagenet/32x32`, `.../64x64`; TFDS
downloads and prepares them in its data dir unless told not to), or an .npz
file with `train_images` and `test_images` uint8 arrays [N, H, W, 3].

`image_grid` and `save_png` show images and their completions
(`decoding.complete_images`) as one PNG file.
"""

import os

import gin
import numpy as np

from trax_hourglass.data import locations
from trax_hourglass.data import streams

TFDS_IMAGE_DATASETS = {
    'cifar10': ('train', 'test'),
    'downsampled_imagenet/32x32': ('train', 'validation'),
    'downsampled_imagenet/64x64': ('train', 'validation'),
}


def flatten_images(images):
  """uint8 [N, H, W, C] -> int32 [N, H*W*C] in raster order, channels interleaved."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 [N, H, W, C], got {images.dtype} '
                     f'{images.shape}')
  return images.reshape(images.shape[0], -1).astype(np.int32)


def unflatten_images(tokens, height, width, channels=3):
  """The inverse of `flatten_images`: [N, H*W*C] -> uint8 [N, H, W, C]."""
  return np.asarray(tokens).reshape(-1, height, width, channels).astype(np.uint8)


def image_grid(originals, completions, border=2, fill=255):
  """A grid image: originals in the top row, completions in rows below.

  Args:
    originals: uint8 (n, H, W, C).
    completions: uint8 (n, H, W, C), or (k, n, H, W, C) for k rows of them.
    border: pixels between and around the images.
    fill: value of the border pixels (255: white).

  Returns:
    uint8 (rows*H + (rows+1)*border, n*W + (n+1)*border, C), rows = 1 + k.
  """
  originals = np.asarray(originals)
  completions = np.asarray(completions)
  if completions.ndim == originals.ndim:
    completions = completions[None]
  if originals.ndim != 4 or completions.shape[1:] != originals.shape:
    raise ValueError(
        f'originals {originals.shape} and completions {completions.shape} '
        'must be (n, H, W, C) and (n, H, W, C) or (k, n, H, W, C).')
  rows = [originals] + list(completions)
  n, height, width, channels = originals.shape
  grid = np.full((len(rows) * (height + border) + border,
                  n * (width + border) + border, channels), fill, np.uint8)
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      y, x = border + r * (height + border), border + c * (width + border)
      grid[y:y + height, x:x + width] = image
  return grid


def save_png(array, path):
  """Writes uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PNG file.

  Uses PIL when installed, else TensorFlow's encoder; creates the folder.

  Returns:
    The path written (user-expanded).
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
      array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
    raise ValueError(f'save_png needs uint8 (H, W) or (H, W, 1|3|4), got '
                     f'{array.dtype} {array.shape}.')
  path = os.path.expanduser(os.fspath(path))
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:  # TensorFlow is a dependency: always there.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if array.ndim == 2:
      array = array[..., None]
    tf.io.write_file(path, tf.io.encode_png(array))
    return path
  Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                  else array).save(path, format='PNG')
  return path


def array_image_inputs(train_images, eval_images, name, batch_size,
                       eval_batch_size=None, seed=0):
  """trax `Inputs` over in-memory uint8 image arrays.

  Training batches sample images in a fresh random order each epoch (fixed by
  the seed and epoch, so a resumed run reads the same batches); evaluation
  batches go through `eval_images` in order, wrapping.
  """
  eval_batch_size = eval_batch_size or batch_size
  train = flatten_images(train_images)
  held_out = flatten_images(eval_images)
  n = len(train)
  key = f'{name}/s{seed}'
  # Multi-host: positions count global batches; each process reads its slice
  # (see `streams.process_shard`).
  index, count = streams.process_shard()

  def train_batch(i):
    start = (i * count + index) * batch_size
    pos = np.arange(start, start + batch_size)
    epochs, offsets = pos // n, pos % n
    idx = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
      perm = streams.rng_for(seed, e).permutation(n)
      idx[epochs == e] = perm[offsets[epochs == e]]
    x = train[idx]
    return (x, x, np.ones(x.shape, np.float32))

  def eval_batch(i):
    start = (i * count + index) * eval_batch_size
    idx = (np.arange(eval_batch_size) + start) % len(held_out)
    x = held_out[idx]
    return (x, x, np.ones(x.shape, np.float32))

  return streams.ResumableInputs(
      lambda: streams.resumable_stream(f'{key}/train/b{batch_size * count}',
                                       train_batch),
      lambda: streams.resumable_stream(
          f'{key}/eval/b{eval_batch_size * count}', eval_batch),
      batch_size, eval_batch_size)


@gin.configurable(module='trax_hourglass')
def npz_image_inputs(path=gin.REQUIRED, batch_size=8, eval_batch_size=None,
                     seed=0):
  """Images from an .npz with uint8 `train_images` and `test_images` [N,H,W,3].

  Returns:
    `trax.data.inputs.Inputs`; batches `(x, x, ones)`, x int32 [batch, H*W*3].
  """
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'image file {path} does not exist')
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in ('train_images', 'test_images') if k not in f.files]
    if missing:
      raise ValueError(f'{path}: has arrays {sorted(f.files)}, needs '
                       f'{missing} (uint8 [N, H, W, 3])')
    train, test = f['train_images'], f['test_images']
  return array_image_inputs(train, test, 'npz/' + os.path.basename(path),
                            batch_size, eval_batch_size, seed)


def load_tfds_images(dataset_name, split, data_dir=None, download=True):
  """All images of a TFDS split as uint8 [N, H, W, 3] (TFDS prepares them)."""
  data_dir = locations.default_data_dir(data_dir)
  images = [ex['image'] for ex in locations.tfds_examples(
      dataset_name, split, data_dir, download)]
  return np.stack(images).astype(np.uint8)


@gin.configurable(module='trax_hourglass')
def tfds_image_inputs(dataset_name='cifar10', batch_size=8, eval_batch_size=None,
                      data_dir=None, download=True, seed=0):
  """CIFAR-10 / downsampled ImageNet 32x32 or 64x64 from TFDS, flattened.

  The splits are read into memory (CIFAR-10 180 MB; ImageNet32 3.9 GB;
  ImageNet64 15.7 GB of uint8), then served as `array_image_inputs`.

  Args:
    dataset_name: one of `TFDS_IMAGE_DATASETS`.
    batch_size: images per training batch (a multiple of the device count).
    eval_batch_size: images per eval batch (default batch_size).
    data_dir: the TFDS data dir (see `locations.default_data_dir`).
    download: let TFDS download and prepare the data if missing.
    seed: seed of the training order.

  Returns:
    `trax.data.inputs.Inputs`; batches `(x, x, ones)`, x int32 [batch, H*W*3].
  """
  if dataset_name not in TFDS_IMAGE_DATASETS:
    raise ValueError(f'dataset_name must be one of '
                     f'{sorted(TFDS_IMAGE_DATASETS)}, got {dataset_name!r}')
  train_split, eval_split = TFDS_IMAGE_DATASETS[dataset_name]
  train = load_tfds_images(dataset_name, train_split, data_dir, download)
  held_out = load_tfds_images(dataset_name, eval_split, data_dir, download)
  return array_image_inputs(train, held_out, 'tfds/' + dataset_name,
                            batch_size, eval_batch_size, seed)
