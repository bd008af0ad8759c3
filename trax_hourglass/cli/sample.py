"""`hourglass-sample`: text or image completions from a trained model.

    hourglass-sample --output_dir=~/runs/hg_enwik8 --prompt='The ' \
        --n_tokens=500 --temperature=0.8 --top_k=40
    hourglass-sample --output_dir=~/runs/hg_cifar10 --images=cifar10.npz \
        --n_images=8 --out=grid.png
    hourglass-sample --checkpoint=released/model_200000.pkl.gz --original \
        --config_file=gin/imagenet32_hourglass.gin --images=imagenet32.npz

Builds the run's model in 'predict' mode from its gin config (config.gin in
--output_dir or beside --checkpoint) and loads its committed checkpoint;
--original reads a checkpoint of trax's HourglassLM into ours (--config_file
then names our gin config of the same architecture). Text mode (vocab 256):
--prompt's UTF-8 bytes start each sequence; prompt and continuation go to
stdout. Image mode: the first --n_images `test_images` of an .npz keep their
top half, the bottom half is sampled, and a PNG grid (originals above) goes
to --out. Progress with tokens/s goes to stderr.
"""

import argparse
import os
import sys

import numpy as np

from trax_hourglass import cli
from trax_hourglass.cli import run_command


def _parse_args(argv):
  parser = cli.ArgumentParser(
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
  return parser.parse_args(argv)


# Below this many tokens (prompt + new, times the batch) the caches are small
# next to any memory; above, their size is estimated before they are made.
_ESTIMATE_FROM_TOKENS = 8192


def _cache_bytes(config, max_len, batch):
  """Bytes of a predict-mode model's state (its caches), without making it."""
  import jax  # pylint: disable=g-import-not-at-top
  from trax import shapes  # pylint: disable=g-import-not-at-top
  model = config.build('predict', max_len)

  def init():
    model.init(shapes.ShapeDtype((batch, 1), np.int32))
    return model.state

  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(jax.eval_shape(init))
             if hasattr(x, 'dtype'))


def _free_memory():
  """(bytes free for the caches, where): the accelerator's, else the host's."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  stats = device.memory_stats()  # None on CPU.
  if stats and 'bytes_limit' in stats:
    return (stats['bytes_limit'] - stats.get('bytes_in_use', 0),
            f'{device.platform} device memory')
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024, 'available host memory'
  except OSError:
    pass
  return (os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'),
          'free host memory')


def _check_memory(config, prompt_len, n_tokens, batch, what=None):
  """Refuses a length whose caches would not fit (an OOM, or swapping), for
  `config` (a `runs.RunConfig`)."""
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top
  length = prompt_len + n_tokens
  if (length * batch <= _ESTIMATE_FROM_TOKENS or
      not runs.is_our_hourglass(config.model_fn)):
    return
  small = 512  # The caches grow linearly with max_len: two points tell.
  at_small, at_double = (_cache_bytes(config, n, batch)
                         for n in (small, 2 * small))
  per_token = max(1.0, (at_double - at_small) / small)
  fixed = at_small - per_token * small
  need = fixed + per_token * length
  free, where = _free_memory()
  if need > 0.8 * free:
    most = int((0.8 * free - fixed) // per_token) - prompt_len
    raise ValueError(
        f'{what or f"--n_tokens={n_tokens}"}: the caches for {length:,} '
        f'tokens x batch {batch} need {need / 2**30:,.1f} GiB, more than fits in the '
        f'{free / 2**30:,.1f} GiB of {where}; ask for at most '
        f'{max(0, most):,} tokens (or a smaller batch).')


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


def _prompt_bytes(prompt):
  """--prompt as the bytes given: Python reads bytes of the command line that
  are not UTF-8 as surrogates, which give them back unchanged."""
  return prompt.encode('utf-8', errors='surrogateescape')


def _check_args(args):
  """Refuses, in one line, flags that cannot work together or would sample
  garbage; returns the run's output dir or checkpoint file."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  if args.n_tokens < 1:
    raise ValueError(f'--n_tokens={args.n_tokens}; use 1 or more.')
  if args.batch_size < 1:
    raise ValueError(f'--batch_size={args.batch_size}; use 1 or more.')
  decoding.check_sampling_settings(
      args.temperature, args.top_k, args.seed,
      {k: f'--{k}' for k in ('temperature', 'top_k', 'seed')})
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
  if args.original and not args.config_file:
    raise ValueError(
        "--original needs --config_file: one of our gin configs with the "
        "original's architecture (e.g. gin/imagenet32_hourglass.gin).")
  return source


def _check_vocab(vocab, top_k, images):
  """Refuses a model whose vocabulary (its config's) the mode cannot use."""
  if vocab is None:
    raise ValueError('the gin config binds no vocab_size of train.model; '
                     'bind it (e.g. HourglassLM.vocab_size = 256).')
  if top_k is not None and top_k > vocab:
    raise ValueError(f'--top_k={top_k} is more than the model\'s '
                     f'{vocab} tokens; use 1..{vocab} (or leave it out).')
  if vocab != 256:
    raise ValueError(
        f'image mode needs a model of 256 subpixel values; this one has '
        f'vocab_size {vocab}.' if images is not None else
        f'text mode needs a byte-level model (vocab_size 256); this one has '
        f'vocab_size {vocab}.')


def run(args):
  """Samples; returns the text samples (list of str) or the grid (uint8)."""
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top

  source = _check_args(args)
  configs = runs.run_configs(args.config_file, source)
  cli.check_gin_files(configs)
  config = runs.read_config(configs)  # The one parse of the config.
  images = prompt = None
  if args.images:
    images = _load_test_images(args.images, args.n_images)
    prompt_len, n_new = 0, int(np.prod(images.shape[1:]))
    batch, what = len(images), f'--images of {n_new} subpixels'
    _check_memory(config, 0, n_new, batch,
                  f'--n_images={batch} of {n_new} subpixels')
  else:
    prompt = np.frombuffer(_prompt_bytes(args.prompt), np.uint8)
    prompt_len, n_new, batch = len(prompt), args.n_tokens, args.batch_size
    what = f'--n_tokens={n_new} after a prompt of {prompt_len} bytes'
    _check_memory(config, prompt_len, n_new, batch)
  # The caches need only this sequence's length.
  model = decoding.load_predict_model(
      source, config=config, max_len=prompt_len + n_new, batch_size=batch)
  _check_vocab(config.vocab_size, args.top_k, images)
  # A model whose own max_len is shorter (trax's TransformerLM): refused
  # now, before its position tables clamp and decode garbage.
  decoding.check_room(model, prompt_len, n_new, what)
  if images is not None:
    return _complete_images(args, model, images)
  return _continue_text(args, model, prompt)


def _complete_images(args, model, images):
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  completions = decoding.complete_images(
      model, images, seed=args.seed, temperature=args.temperature,
      top_k=args.top_k, progress=_Progress('subpixels'))
  grid = decoding.image_grid(images, completions)
  path = decoding.save_png(grid, args.out)
  print(f'Wrote {path}: {len(images)} images (top row) and their '
        'completions (bottom halves sampled, second row).', flush=True)
  return grid


def _continue_text(args, model, prompt):
  from trax_hourglass import decoding  # pylint: disable=g-import-not-at-top
  tokens = decoding.sample(
      model, args.n_tokens, prompt=prompt if len(prompt) else None,
      batch_size=args.batch_size, temperature=args.temperature,
      top_k=args.top_k, seed=args.seed, progress=_Progress('bytes'))
  texts = []
  for i, row in enumerate(tokens):
    text = (_prompt_bytes(args.prompt) + bytes(row.astype(np.uint8))).decode(
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
