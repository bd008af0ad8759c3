"""`hourglass-eval`: bits per byte / per dim of a trained run's checkpoint.

    hourglass-eval --output_dir=~/runs/hg_enwik8 --split=test
    hourglass-eval --output_dir=RUN --byte_file=../shared/data/enwik8-head.xml

Builds the run's `train.model` (gin config: `output_dir/config.gin`, or
--config_file) in 'eval' mode, loads its committed checkpoint safely and scores
a whole split: byte data (enwik8, a byte file, the stdlib corpus) in windows
of the model's length whose first `sequence_length - stride` bytes are context
only, every byte once (bits per byte); images (CIFAR-10, ImageNet, .npz) every
subpixel, each image on its own (bits per dim). The result goes to stdout and,
as JSON, to --json (default output_dir/eval_<split>.json).
"""

import argparse
import json
import os
import sys
import time

import gin
import numpy as np

from trax_hourglass import cli
from trax_hourglass.cli import run_command
from trax_hourglass.scoring import Scorer
from trax_hourglass.scoring import score_bytes
from trax_hourglass.scoring import score_images


def _parse_args(argv):
  parser = cli.ArgumentParser(
      prog='hourglass-eval', description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output_dir', required=True,
                      help='the training run (checkpoint and config.gin)')
  parser.add_argument('--config_file', action='append', default=[],
                      help='gin config(s) of the run, if not output_dir/'
                           'config.gin')
  parser.add_argument('--config', action='append', default=[],
                      help='extra gin bindings')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default='test', choices=('valid', 'test'),
                      help='byte data split (images: the held-out set)')
  parser.add_argument('--byte_file', default=None,
                      help='score this byte file (split 90/5/5) instead of '
                           "the run's data")
  parser.add_argument('--npz', default=None,
                      help="score this .npz's test_images instead of the "
                           "run's data")
  parser.add_argument('--sequence_length', type=int, default=None,
                      help="window length (default: the run's)")
  parser.add_argument('--stride', type=int, default=None,
                      help='bytes scored per window (default: half the '
                           'window, so each has >= half a window of context)')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--max_bytes', type=int, default=None,
                      help='score only the first N bytes of the split')
  parser.add_argument('--max_images', type=int, default=None,
                      help='score only the first N images')
  parser.add_argument('--json', default=None, help='where to write the JSON')
  args = parser.parse_args(argv)
  _check_args(parser, args)
  return args


def _check_args(parser, args):
  """Refuses out-of-range values (argparse's one-line error, exit 2)."""
  for flag, least in (('sequence_length', 2), ('stride', 1), ('batch_size', 1),
                      ('max_bytes', 2), ('max_images', 1)):
    value = getattr(args, flag)
    if value is not None and value < least:
      parser.error(f'--{flag}={value}; use {least} or more'
                   + ('' if flag == 'batch_size' else ' (or leave it out)'))
  if (args.stride is not None and args.sequence_length is not None and
      args.stride > args.sequence_length):
    parser.error(f'--stride={args.stride} is more than --sequence_length='
                 f'{args.sequence_length}; use 1..{args.sequence_length}')
  if args.byte_file and args.npz:
    parser.error('--byte_file and --npz are two kinds of data; pass one')
  if args.json is not None and os.path.isdir(args.json):
    parser.error(f'--json={args.json} is a directory; pass a file path, e.g. '
                 f'{os.path.join(args.json, "eval.json")}')


def _bound(name, default=None):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


class _Progress:
  """One stderr line, rewritten per batch: done/total, bits so far, speed, ETA."""

  def __init__(self, unit):
    self._unit, self._start = unit, time.time()

  def __call__(self, done, total, bits, scored):
    secs = time.time() - self._start
    left = secs / done * (total - done) if done else float('nan')
    rate = f'{bits / scored:.4f} bits/{self._unit}' if scored else '-'
    end = '\n' if done >= total else ''
    print(f'\r[{done}/{total} batches] {rate} | '
          f'{scored / max(secs, 1e-9):,.0f} {self._unit}s/s | left {left:.0f} s',
          end=end, file=sys.stderr, flush=True)


def _byte_data(args):
  """(uint8 array of the split, description) from flags or the run's gin."""
  from trax_hourglass.data import text  # pylint: disable=g-import-not-at-top
  if args.byte_file:
    data = text.load_bytes(os.path.expanduser(args.byte_file))
    bounds, source = text.byte_file_splits(len(data)), args.byte_file
  else:
    inputs = _bound('train.inputs')
    name = inputs.configurable.name if inputs is not None else None
    if name == 'enwik8_inputs':
      path = text.enwik8_path(_bound('enwik8_inputs.data_dir'),
                              _bound('enwik8_inputs.download', True))
      data, bounds, source = text.load_bytes(path), text.ENWIK8_SPLITS, path
    elif name == 'byte_file_inputs':
      path = os.path.expanduser(_bound('byte_file_inputs.path'))
      data = text.load_bytes(path)
      bounds = text.byte_file_splits(
          len(data), _bound('byte_file_inputs.splits', (0.9, 0.05, 0.05)))
      source = path
    elif name == 'stdlib_text_inputs':
      path = text.stdlib_corpus(_bound('stdlib_text_inputs.max_bytes',
                                       8_000_000))
      data, source = text.load_bytes(path), path
      bounds = text.byte_file_splits(len(data))
    else:
      return None
  start, end = bounds[args.split]
  data = data[start:end]
  if args.max_bytes is not None:
    data = data[:args.max_bytes]
  return data, f'{source} [{args.split}: bytes {start:,}..{end:,})'


def _image_data(args):
  """int [N, D] tokens of the held-out images, from flags or the run's gin."""
  from trax_hourglass.data import images  # pylint: disable=g-import-not-at-top
  if args.npz:
    path = os.path.expanduser(args.npz)
  else:
    inputs = _bound('train.inputs')
    name = inputs.configurable.name if inputs is not None else None
    if name == 'npz_image_inputs':
      path = os.path.expanduser(_bound('npz_image_inputs.path'))
    elif name == 'tfds_image_inputs':
      dataset = _bound('tfds_image_inputs.dataset_name', 'cifar10')
      split = images.TFDS_IMAGE_DATASETS[dataset][1]
      held_out = images.load_tfds_images(
          dataset, split, _bound('tfds_image_inputs.data_dir'),
          _bound('tfds_image_inputs.download', True))
      tokens = images.flatten_images(held_out[:args.max_images])
      return tokens, f'TFDS {dataset} [{split}]'
    else:
      return None
  with np.load(path, allow_pickle=False) as f:
    held_out = f['test_images']
  return images.flatten_images(held_out[:args.max_images]), f'{path} [test]'


def _check_writable(path):
  """Raises OSError now if `path` cannot be written (removes the probe)."""
  from trax_hourglass import files  # pylint: disable=g-import-not-at-top
  probe = files.temporary_name(path)
  with files.create_new(probe):  # Never through a link planted there.
    pass
  os.remove(probe)


def _write_json(path, result):
  """Writes `result` to `path` atomically, never through a link planted at
  `path` or at a temporary name."""
  from trax_hourglass import files  # pylint: disable=g-import-not-at-top
  text = json.dumps(result, indent=1).encode()
  files.write_atomically(path, lambda f: f.write(text))


def run(args):
  """Evaluates; returns the result dict."""
  from trax_hourglass import data as hg_data  # pylint: disable=g-import-not-at-top
  from trax_hourglass import runs  # pylint: disable=g-import-not-at-top

  output_dir = os.path.expanduser(args.output_dir)
  if not os.path.isdir(output_dir):
    raise FileNotFoundError(f'--output_dir {output_dir} is not a directory; '
                            'pass the output dir of a training run.')
  configs = runs.run_configs(args.config_file, output_dir)
  cli.check_gin_files(configs, 'gin config')
  json_path = args.json or os.path.join(output_dir, f'eval_{args.split}.json')
  _check_writable(json_path)  # Now, not after minutes of scoring.
  if args.data_dir:
    hg_data.set_default_data_dir(os.path.expanduser(args.data_dir))
  # The config parsed once, as data; the checkpoint read safely, checked.
  loaded = runs.load_run(output_dir, 'eval', configs, args.config,
                         finalize=True)
  model, vocab, ckpt = loaded.model, loaded.vocab_size, loaded.checkpoint
  trained_len = int(ckpt.data['input_signature'][0].shape[1])
  scorer = Scorer(model)
  start = time.time()
  result = {'output_dir': output_dir, 'step': ckpt.step}
  byte_data = None if args.npz else _byte_data(args)
  if byte_data is not None:
    data, source = byte_data
    hg_data.streams.check_token_range(data, source, vocab)
    seq_len = args.sequence_length or trained_len
    stride = args.stride if args.stride is not None else max(1, seq_len // 2)
    if stride > seq_len:
      raise ValueError(f'--stride={stride} is more than the window of '
                       f'{seq_len}; use 1..{seq_len}.')
    bits, n = score_bytes(scorer, data, seq_len, stride, args.batch_size,
                          _Progress('byte'))
    result.update(metric='bits_per_byte', value=bits / n, n_bytes=n,
                  sequence_length=seq_len, stride=stride,
                  min_context=seq_len - stride, data=source)
    line = (f'{bits / n:.4f} bits per byte on {n:,} bytes of {source} '
            f'(windows of {seq_len}, >= {seq_len - stride} bytes of context)')
  else:
    image_data = _image_data(args)
    if image_data is None:
      raise ValueError("the run's train.inputs is neither byte data nor "
                       'images; pass --byte_file or --npz')
    tokens, source = image_data
    hg_data.streams.check_token_range(tokens, source, vocab)
    bits, n = score_images(scorer, tokens, args.batch_size, _Progress('dim'))
    result.update(metric='bits_per_dim', value=bits / n, n_dims=n,
                  n_images=len(tokens), data=source)
    line = (f'{bits / n:.4f} bits per dim on {len(tokens):,} images '
            f'({n:,} subpixels) of {source}')
  result['seconds'] = time.time() - start
  print(f'step {ckpt.step}: {line}', flush=True)
  _write_json(json_path, result)
  print(f'Wrote {json_path}', flush=True)
  return result


def main(argv=None):
  """Console entry point."""
  return run_command('hourglass-eval', _parse_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
