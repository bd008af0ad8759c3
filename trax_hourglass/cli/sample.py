"""`hourglass-sample`: text or image completions from a trained model.

    hourglass-sample --output_dir=~/runs/hg_enwik8 --prompt='The ' \
        --n_tokens=500 --temperature=0.8 --top_k=40
    hourglass-sample --output_dir=~/runs/hg_cifar10 --images=cifar10.npz \
        --n_images=8 --out=grid.png
    hourglass-sample --checkpoint=released/model_200000.pkl.gz --original \
        --config_file=gin/imagenet32_hourglass.gin --images=imagenet32.npz

Builds the run's model in 'predict' mode from its gin config (default
config.gin in --output_dir, or beside --checkpoint, which the trainer writes)
and loads the committed checkpoint (`trax_hourglass.checkpoints`); --original
reads a checkpoint of trax's own HourglassLM into ours (then --config_file is
one of our gin configs with the same architecture).

Text mode (byte-level models, vocab 256: a token is a byte): the UTF-8 bytes
of --prompt start each sequence; the prompt and its continuation go to stdout,
one block per sequence. Image mode: the first --n_images `test_images` of an
.npz (uint8 [N, H, W, 3], as `trax_hourglass.data.images`) keep their top
half, the bottom half is sampled, and a PNG grid (originals above,
completions below) goes to --out. Progress with tokens/s goes to stderr.
"""

import argparse
import os
import sys

import numpy as np

from trax_hourglass.cli import run_command


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='hourglass-sample', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--output_dir',
                     help='a training run (its committed checkpoint)')
  where.add_argument('--checkpoint', help='a *.pkl.gz checkpoint file')
  parser.add_argument('--config_file', action='append', default=[],
                      help='gin config of the model (default: config.gin of '
                           'the run)')
  parser.add_argument('--original', action='store_true',
                      help="the checkpoint is of trax's own HourglassLM")
  parser.add_argument('--prompt', default='',
                      help='text mode: the text to continue')
  parser.add_argument('--n_tokens', type=int, default=200,
                      help='text mode: bytes to generate')
  parser.add_argument('--images', default=None,
                      help='image mode: .npz with test_images uint8 '
                           '[N, H, W, C]')
  parser.add_argument('--n_images', type=int, default=8,
                      help='image mode: images to complete')
  parser.add_argument('--out', default='completions.png',
                      help='image mode: the PNG grid to write')
  parser.add_argument('--temperature', type=float, default=1.0,
                      help='0 for greedy decoding')
  parser.add_argument('--top_k', type=int, default=None,
                      help='sample among the k most likely tokens only')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=1,
                      help='text mode: sequences sampled at once')
  parser.add_argument('--traceback', action='store_true',
                      help='show the full traceback of an error')
  return parser.parse_args(argv)


class _Progress:
  """One stderr line, rewritten: tokens done/total and tokens/s."""

  def __init__(self, what):
    self._what = what
    self._width = 0

  def __call__(self, done, total, tokens_per_s):
    end = '\n' if done >= total else ''
    line = f'[{done}/{total} {self._what}] {tokens_per_s:,.1f} tokens/s'
    self._width = max(self._width, len(line))  # Covers a longer last line.
    print('\r' + line.ljust(self._width), end=end, file=sys.stderr,
          flush=True)


def _vocab_size(model):
  """The model's output vocabulary: the last weight is its final Dense bias."""
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  return int(fastmath.tree_flatten(model.weights)[-1].shape[-1])


def _load_test_images(path, n_images):
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'--images {path} does not exist')
  with np.load(path, allow_pickle=False) as f:
    if 'test_images' not in f.files:
      raise ValueError(f'--images {path} has arrays {sorted(f.files)}; it '
                       'needs test_images (uint8 [N, H, W, C]).')
    images = f['test_images']
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'--images {path}: test_images is {images.dtype} '
                     f'{images.shape}; it must be uint8 [N, H, W, C].')
  if n_images < 1:
    raise ValueError(f'--n_images={n_images}; use 1 or more.')
  return images[:n_images]


def run(args):
  """Samples; returns the text samples (list of str) or the grid (uint8)."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top

  if args.n_tokens < 1:
    raise ValueError(f'--n_tokens={args.n_tokens}; use 1 or more.')
  if args.batch_size < 1:
    raise ValueError(f'--batch_size={args.batch_size}; use 1 or more.')
  if args.top_k is not None and args.top_k < 1:
    raise ValueError(f'--top_k={args.top_k}; use 1 or more (or leave it out).')
  if args.temperature < 0:
    raise ValueError(f'--temperature={args.temperature}; use 0 (greedy) or '
                     'more.')
  if args.images and args.prompt:
    raise ValueError('--prompt is for text mode; image mode keeps the top '
                     'half of each of --images as its prompt.')
  source = os.path.expanduser(args.output_dir or args.checkpoint)
  if not os.path.exists(source):
    raise FileNotFoundError(
        f'{"--output_dir" if args.output_dir else "--checkpoint"} {source} '
        'does not exist')
  if args.checkpoint and os.path.isdir(source):
    raise ValueError(f'--checkpoint {source} is a directory; pass it as '
                     '--output_dir, or pass its model.pkl.gz.')
  configs = list(args.config_file)
  if not configs:
    if args.original:
      raise ValueError(
          "--original needs --config_file: one of our gin configs with the "
          "original's architecture (e.g. gin/imagenet32_hourglass.gin).")
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    default = os.path.join(directory, 'config.gin')
    if not os.path.exists(default):
      raise FileNotFoundError(
          f'there is no {default} (the trainer writes it after its first '
          'step); pass the model\'s gin config with --config_file.')
    configs = [default]
  for path in configs:
    if not os.path.exists(path):
      raise FileNotFoundError(f'--config_file {path} does not exist')

  images = None
  if args.images:
    images = _load_test_images(args.images, args.n_images)
    length = int(np.prod(images.shape[1:]))
    batch = len(images)
  else:
    prompt = np.frombuffer(args.prompt.encode('utf-8'), np.uint8)
    length = len(prompt) + args.n_tokens
    batch = args.batch_size
  # The caches need only this sequence's length.
  model = decoding.load_predict_model(
      source, config_file=configs, max_len=length, batch_size=batch,
      original=args.original)
  vocab = _vocab_size(model)

  if images is not None:
    if vocab != 256:
      raise ValueError(f'image mode needs a model of 256 subpixel values; '
                       f'this one has vocab_size {vocab}.')
    completions = decoding.complete_images(
        model, images, seed=args.seed, temperature=args.temperature,
        top_k=args.top_k, progress=_Progress('subpixels'))
    grid = decoding.image_grid(images, completions)
    path = decoding.save_png(grid, args.out)
    print(f'Wrote {path}: {len(images)} images (top row) and their '
          'completions (bottom halves sampled, second row).', flush=True)
    return grid

  if vocab != 256:
    raise ValueError(f'text mode needs a byte-level model (vocab_size 256); '
                     f'this one has vocab_size {vocab}.')
  tokens = decoding.sample(
      model, args.n_tokens, prompt=prompt if len(prompt) else None,
      batch_size=args.batch_size, temperature=args.temperature,
      top_k=args.top_k, seed=args.seed, progress=_Progress('bytes'))
  texts = []
  for i, row in enumerate(tokens):
    text = (args.prompt.encode('utf-8') + bytes(row.astype(np.uint8))).decode(
        'utf-8', errors='replace')
    texts.append(text)
    if args.batch_size > 1:
      print(f'--- sample {i + 1}/{args.batch_size} ---')
    print(text, flush=True)
  return texts


def main(argv=None):
  """Console entry point."""
  return run_command('hourglass-sample', _parse_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
